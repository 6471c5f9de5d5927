"""Rendering of a ready-to-submit sbatch script (text only; files and sbatch live in sbatch.py).

The script, in order: #SBATCH header; exit at once when the run is already COMPLETED (so
the rest of a chain drains in seconds); NCCL/CUDA environment; the rendezvous on the first
node; a trap that turns the scheduler's stop signal into a checkpoint-and-exit of the ranks;
srun (torchrun per node, or one rank per GPU through launch.slurm_env); and an exit code
that tells done (0) from stopped-early-resumable (75) from failed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from nemotron_train.errors import LaunchError
from nemotron_train.rundir import COMPLETED_MARKER, LOGS_DIR
from nemotron_train.training.stop import EXIT_CODE_RESUMABLE

MODES = ("per-node", "per-gpu")
# Signals the batch shell may be asked to forward. TERM is accepted but forwarded as USR1:
# srun answers its own SIGTERM by SIGKILLing the step.
FORWARDABLE_SIGNALS = ("USR1", "USR2", "TERM")
TRAIN_MODULE = "nemotron_train"
# Once the first task of the step ends, srun gives the others this long before killing them.
# Not --kill-on-bad-exit: a rank that stopped early exits 75, and its peers, a moment behind
# it, would be killed with the 75 lost. A crashed rank's peers, stuck in a collective, still
# go within this time instead of idling until the NCCL timeout.
SRUN_WAIT_SECONDS = 120

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# --sbatch-option: a long option with its value in one word; anything else could smuggle a
# second option, a comment or a shell line into the script.
_SBATCH_OPTION_RE = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*=[^\s\"'\\]+$")
# Values sbatch reads from `#SBATCH` lines, which are not shell-parsed: one word, no quotes.
_SBATCH_WORD_RE = re.compile(r"^[^\s\"'\\]+$")


def check_text(option: str, value: object) -> str:
    """`value` as text; LaunchError naming `option` when it holds a control character (a
    newline would end an `#SBATCH` or comment line and start a shell command)."""
    text = str(value)
    if _CONTROL_RE.search(text):
        raise LaunchError(f"{option} {text!r} contains a control character (newline, tab, ...); remove it")
    return text


def sbatch_word(option: str, value: object) -> str:
    """A value for an `#SBATCH` line: no control characters, and one word without quotes,
    because sbatch reads those lines itself and splits them at whitespace."""
    text = check_text(option, value)
    if not _SBATCH_WORD_RE.match(text):
        raise LaunchError(f"{option} {text!r}: an #SBATCH value must be one word without spaces, quotes or backslashes")
    return text


def parse_time(text: str) -> int:
    """SLURM time limit -> seconds. Accepts MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    match = _TIME_RE.match(str(text).strip())
    if not match:
        raise LaunchError(f"--time {text!r}: use HH:MM:SS (or SLURM's MM, MM:SS, D-HH:MM:SS)")
    days, a, b, c = match.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (nums + [0, 0])[:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(nums) == 3:
        total = nums[0] * 3600 + nums[1] * 60 + nums[2]
    elif len(nums) == 2:
        total = nums[0] * 60 + nums[1]
    else:
        total = nums[0] * 60
    if total <= 0:
        raise LaunchError(f"--time {text!r}: the time limit must be positive")
    return total


def parse_signal(text: str) -> Tuple[str, int]:
    """`USR1@120`, `B:USR1@120`, `SIGUSR1@120` -> ("USR1", 120). The batch form (B:) is always
    rendered because the script's trap is what passes the request on to the ranks."""
    match = re.fullmatch(r"(?:B:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?", str(text).strip().upper())
    if not match:
        raise LaunchError(f"--signal {text!r}: use SIGNAL@SECONDS, e.g. USR1@120")
    name, seconds = match.group(1), int(match.group(2) or 60)
    if name not in FORWARDABLE_SIGNALS:
        raise LaunchError(f"--signal {text!r}: use one of {', '.join(FORWARDABLE_SIGNALS)}, e.g. USR1@120")
    if not 0 < seconds <= 65535:
        raise LaunchError(f"--signal {text!r}: seconds before the time limit must be in 1..65535")
    return name, seconds


def forwarded_signal(name: str) -> str:
    """The signal the batch shell sends srun when asked to stop."""
    return "USR2" if name == "USR2" else "USR1"


@dataclass
class SbatchOptions:
    nodes: int
    gpus_per_node: int
    time: str
    nproc_per_node: Optional[int] = None  # ranks per node; default gpus_per_node
    mode: str = "per-node"
    partition: Optional[str] = None
    account: Optional[str] = None
    job_name: Optional[str] = None  # default run.name
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    chain: int = 1
    signal: str = "USR1@120"
    cpus_per_task: Optional[int] = None
    exclusive: bool = False
    python: str = "python"
    workdir: Optional[str] = None  # default: the current directory
    env: List[str] = field(default_factory=list)  # KEY=VALUE exported before srun
    extra_sbatch: List[str] = field(default_factory=list)  # more #SBATCH options, e.g. --qos=high

    @property
    def ranks_per_node(self) -> int:
        return self.nproc_per_node if self.nproc_per_node is not None else self.gpus_per_node

    @property
    def tasks_per_node(self) -> int:
        return 1 if self.mode == "per-node" else self.ranks_per_node

    def validate(self) -> None:
        """ValueError naming the option for anything sbatch would reject or that cannot work."""
        if self.nodes < 1:
            raise LaunchError(f"--nodes {self.nodes}: need at least 1 node")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node {self.gpus_per_node}: cannot be negative")
        if self.ranks_per_node < 1:
            raise LaunchError("--gpus-per-node 0 (CPU) needs --nproc-per-node N for the ranks per node")
        if self.gpus_per_node and self.ranks_per_node > self.gpus_per_node:
            raise LaunchError(
                f"--nproc-per-node {self.ranks_per_node} exceeds --gpus-per-node {self.gpus_per_node}: one rank per GPU"
            )
        if self.mode not in MODES:
            raise LaunchError(f"--mode {self.mode!r}: use per-node (torchrun on each node) or per-gpu (one task per GPU)")
        if self.chain < 1:
            raise LaunchError(f"--chain {self.chain}: need at least 1 job")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task {self.cpus_per_task}: need at least 1")
        limit = parse_time(self.time)
        _, lead = parse_signal(self.signal)
        if lead >= limit:
            raise LaunchError(f"--signal {self.signal}: {lead}s before the end is not inside --time {self.time} ({limit}s)")
        for item in self.env:
            key, sep, _ = item.partition("=")
            if not sep or not _ENV_KEY_RE.match(key):
                raise LaunchError(f"--env {item!r}: use KEY=VALUE")
            check_text("--env", item)
        for item in self.extra_sbatch:
            check_text("--sbatch-option", item)
            if not _SBATCH_OPTION_RE.match(item):
                raise LaunchError(f"--sbatch-option {item!r}: use one --key=value option per --sbatch-option, e.g. --sbatch-option=--qos=high")
        for option, value in (("--job-name", self.job_name), ("--partition", self.partition), ("--account", self.account)):
            if value is not None:
                sbatch_word(option, value)
        for option, value in (("--python", self.python), ("--workdir", self.workdir), ("--container-image", self.container_image),
                              ("--container-mounts", self.container_mounts)):
            if value is not None:
                check_text(option, value)
        if bool(self.container_mounts) and not self.container_image:
            raise LaunchError("--container-mounts needs --container-image")


@dataclass
class RunPaths:
    """What the script needs to know about the run, all absolute."""

    config: str  # the resolved-config snapshot the ranks read
    run_dir: str  # run.output_dir
    workdir: str  # the job's working directory (relative config paths resolve from here)
    train_steps: int
    source: str = ""  # the config the user rendered from, for the header comment
    socket_ifname: Optional[str] = None  # launch.socket_ifname: the interface ranks talk over
    max_restarts: int = 0  # launch.max_restarts: torchrun restarts of the node's ranks


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _header(opts: SbatchOptions, run: RunPaths, job_name: str) -> List[str]:
    sig, lead = parse_signal(opts.signal)
    lines = [
        "#!/bin/bash",
        f"# Rendered by `nemotron-train sbatch` from {check_text('the config path', run.source or run.config)}.",
        f"# The ranks read the config snapshot {check_text('the config snapshot path', run.config)};",
        "# edit that copy (not the original) to change what this job trains.",
        f"#SBATCH --job-name={sbatch_word('the job name (--job-name, default run.name)', job_name)}",
        f"#SBATCH --nodes={opts.nodes}",
        f"#SBATCH --ntasks-per-node={opts.tasks_per_node}",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    lines.append(f"#SBATCH --time={opts.time}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={sbatch_word('--partition', opts.partition)}")
    if opts.account:
        lines.append(f"#SBATCH --account={sbatch_word('--account', opts.account)}")
    if opts.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [
        f"#SBATCH --signal=B:{sig}@{lead}",
        f"#SBATCH --output={sbatch_word('run.output_dir', run.run_dir)}/{LOGS_DIR}/%x-%j.out",
        f"#SBATCH --chdir={sbatch_word('the working directory', run.workdir)}",
    ]
    if opts.chain > 1:
        lines.append("#SBATCH --dependency=singleton")
    lines += [f"#SBATCH {sbatch_word('--sbatch-option', extra)}" for extra in opts.extra_sbatch]
    return lines


def _settings(opts: SbatchOptions, run: RunPaths) -> List[str]:
    return [
        "",
        "set -euo pipefail",
        "",
        f"RUN_DIR={_q(run.run_dir)}",
        f"CONFIG={_q(run.config)}",
        f"TRAIN_STEPS={run.train_steps}",
        f"EXIT_CODE_RESUMABLE={EXIT_CODE_RESUMABLE}",
        "# The ranks' interpreter: $PYTHON from the submitting environment, else --python.",
        f'PYTHON="${{PYTHON:-}}"; [[ -n "$PYTHON" ]] || PYTHON={_q(check_text("--python", opts.python))}',
        "export CONFIG PYTHON",
        "",
        'echo "[$(date -Is)] job $SLURM_JOB_ID ($SLURM_JOB_NAME): $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST"',
        "",
        "# The trainer writes COMPLETED (first line: steps trained) after its final checkpoint.",
        "run_completed() {",
        f'  [[ -f "$RUN_DIR/{COMPLETED_MARKER}" ]] || return 1',
        "  local done_steps",
        f'  done_steps=$(sed -n 1p "$RUN_DIR/{COMPLETED_MARKER}" | tr -cd 0-9)',
        '  [[ -z "$done_steps" ]] || (( done_steps >= TRAIN_STEPS ))',
        "}",
        "# A finished run ends every later job of its chain here, in seconds.",
        "if run_completed; then",
        '  echo "run already complete ($RUN_DIR/COMPLETED): nothing to do"',
        "  exit 0",
        "fi",
    ]


def _ifname_address(ifname: str) -> str:
    """Shell that prints this node's IPv4 address on `ifname` (empty if none). No single
    quotes: it also goes inside the single-quoted per-node command."""
    return f"ip -4 -o addr show dev {_q(ifname)} 2>/dev/null | sed -n 1p | tr -s \" \" | cut -d\" \" -f4 | cut -d/ -f1"


def _environment(opts: SbatchOptions, run: RunPaths) -> List[str]:
    lines = [
        "",
        "# ---- environment",
        "# Megatron overlaps tensor/sequence-parallel communication with compute only if the",
        "# GPU runs kernels in issue order: one hardware queue per device.",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        "# A failed or hung NCCL collective raises in the rank instead of blocking forever, so a",
        "# broken node ends the job (and the chain's next job retries) instead of idling to the limit.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        "# Cluster-specific fabric settings belong here (or in --env KEY=VALUE), for example:",
        "#   export NCCL_IB_HCA=mlx5           # InfiniBand adapters NCCL may use",
        "#   export NCCL_IB_TIMEOUT=22         # tolerate slow IB links before a collective fails",
        "#   export NCCL_SOCKET_IFNAME=eth0    # interface for NCCL's bootstrap sockets",
        "# One OpenMP thread per rank (torchrun's default) so ranks do not oversubscribe the cores.",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"',
        "export PYTHONUNBUFFERED=1",
    ]
    if run.socket_ifname:
        lines += [
            "# launch.socket_ifname: gloo and NCCL open their sockets on this interface only.",
            f"export GLOO_SOCKET_IFNAME={_q(run.socket_ifname)} NCCL_SOCKET_IFNAME={_q(run.socket_ifname)}",
        ]
    for item in opts.env:
        key, _, value = item.partition("=")
        lines.append(f"export {key}={_q(value)}")
    return lines


def _slurm_mapping():
    """nemotron_train.distributed.slurm (pure Python, cheap to import)."""
    from nemotron_train.distributed import slurm

    return slurm


def _rendezvous(run: RunPaths) -> List[str]:
    slurm = _slurm_mapping()
    lines = [
        "",
        "# ---- rendezvous: the first node of the allocation, a port derived from the job id",
    ]
    if run.socket_ifname:
        lines += [
            "# The batch script runs on the first node: its address on launch.socket_ifname.",
            f"MASTER_ADDR=$({_ifname_address(run.socket_ifname)})",
            'if [[ -z "$MASTER_ADDR" ]]; then',
            f'  echo "launch.socket_ifname={run.socket_ifname}: no IPv4 address on $(hostname -s)" >&2',
            "  exit 1",
            "fi",
        ]
    else:
        lines += [
            "if command -v scontrol >/dev/null 2>&1; then",
            '  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            "else",
            "  MASTER_ADDR=$(hostname -s)  # the batch script runs on the first node of the allocation",
            "fi",
        ]
    return lines + [
        f"MASTER_PORT=$(( {slurm.RDZV_PORT_BASE} + SLURM_JOB_ID % {slurm.RDZV_PORT_SPAN} ))",
        "export MASTER_ADDR MASTER_PORT",
        'echo "rendezvous at $MASTER_ADDR:$MASTER_PORT"',
    ]


def _stop_trap(opts: SbatchOptions) -> List[str]:
    sig, _ = parse_signal(opts.signal)
    forward = forwarded_signal(sig)
    trapped = list(dict.fromkeys([sig, "USR1", "TERM"]))
    lines = [
        "",
        "# ---- graceful stop",
        f"# `--signal=B:{sig}@N` signals this batch shell only, and bash runs a trap only between",
        "# commands, so srun runs in the background and the trap passes the request on: srun",
        f"# forwards {forward} to every process of the step; the ranks agree to stop, save a",
        f"# checkpoint and exit. A TERM is passed on as {forward} as well: srun answers its own",
        "# SIGTERM by SIGKILLing the step, which would lose the checkpoint being written.",
        'STOP_SIGNAL=""',
        "INTERRUPTED=0",
        'SRUN_PID=""',
        "request_stop() {",
        '  STOP_SIGNAL=$1',
        "  INTERRUPTED=1",
        '  echo "[$(date -Is)] batch shell got SIG$1: asking the ranks to checkpoint and stop" >&2',
        '  if [[ -n "$SRUN_PID" ]]; then',
        f'    kill -s {forward} "$SRUN_PID" 2>/dev/null || true',
        "  fi",
        "}",
    ]
    lines += [f"trap 'request_stop {name}' {name}" for name in trapped]
    return lines


def _srun_prefix(opts: SbatchOptions, run: RunPaths) -> List[str]:
    args = [f"--ntasks-per-node={opts.tasks_per_node}", f"--wait={SRUN_WAIT_SECONDS}"]
    if opts.container_image:
        # pyxis/enroot: the step runs in the image; the working directory is the same path.
        args.append(f"--container-image={_q(opts.container_image)}")
        if opts.container_mounts:
            args.append(f"--container-mounts={_q(opts.container_mounts)}")
        args.append(f"--container-workdir={_q(run.workdir)}")
    return ["srun", *args]


def _train_args(opts: SbatchOptions) -> List[str]:
    return [
        "-m", TRAIN_MODULE, "train", '"$CONFIG"',
        'launch.nnodes="$SLURM_JOB_NUM_NODES"', f"launch.nproc_per_node={opts.ranks_per_node}",
    ]


def _launch(opts: SbatchOptions, run: RunPaths) -> List[str]:
    sig, _ = parse_signal(opts.signal)
    srun = _srun_prefix(opts, run)
    lines = [
        "",
        "# ---- launch",
        'if [[ -n "$STOP_SIGNAL" ]]; then',
        '  echo "stop requested before the launch; nothing trained"',
        '  exit "$EXIT_CODE_RESUMABLE"',
        "fi",
    ]
    if opts.mode == "per-gpu":
        lines += [
            "# One task per GPU; launch.slurm_env maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to",
            "# RANK/WORLD_SIZE/LOCAL_RANK and execs the rank.",
            " ".join(srun) + " \\",
            '  "$PYTHON" -m launch.slurm_env --master-addr "$MASTER_ADDR" -- \\',
            '  "$PYTHON" ' + " ".join(_train_args(opts)) + " &",
        ]
    else:
        ignored = " ".join(dict.fromkeys(["TERM", "USR1", forwarded_signal(sig)]))
        rdzv = _slurm_mapping().torchrun_args('"$SLURM_JOB_NUM_NODES"', opts.ranks_per_node, '"$SLURM_NODEID"',
                                              '"$MASTER_ADDR"', '"$MASTER_PORT"', '"$SLURM_JOB_ID"')
        lines += [
            "# One task per node runs torchrun, which starts the node's ranks and meets the other",
            "# nodes at a c10d rendezvous on the first node. SLURM signals every process of the",
            "# step, torchrun included: it ignores the stop signals (its default would be to die or",
            "# to kill the ranks after 30 s) while the ranks, which install their own handlers,",
            "# checkpoint and exit.",
            " ".join(srun) + " bash -c '",
            f'  trap "" {ignored}',
            "  # torchrun reads --signals-to-handle from PET_SIGNALS_TO_HANDLE; older releases read",
            "  # TORCHELASTIC_SIGNALS_TO_HANDLE. SIGTERM left out: it stays ignored, as trapped above.",
            "  export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT",
        ]
        if run.socket_ifname:
            lines += [
                "  # Each node announces its own address on launch.socket_ifname, not its hostname.",
                f"  LOCAL_ADDR=$({_ifname_address(run.socket_ifname)})",
            ]
            rdzv.append('${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"}')
        if run.max_restarts:  # in-job restart: the new ranks resume from the latest checkpoint
            rdzv.append(f"--max-restarts={int(run.max_restarts)}")
        lines += [
            '  exec "$PYTHON" -m torch.distributed.run \\',
            "    " + " ".join(rdzv) + " \\",
            "    " + " ".join(_train_args(opts)) + "' &",
        ]
    lines.append("SRUN_PID=$!")
    return lines


def _wait_and_exit() -> List[str]:
    return [
        "",
        "# A trap makes `wait` return early (128+signal) while srun still runs: wait again.",
        'rc=""',
        "while :; do",
        "  INTERRUPTED=0",
        '  if wait "$SRUN_PID"; then status=0; else status=$?; fi',
        "  # 127: the previous `wait` had already collected srun's status (a trap ran just after).",
        '  if [[ -n "$rc" ]] && (( status == 127 )); then break; fi',
        "  rc=$status",
        "  (( INTERRUPTED )) || break",
        "done",
        "",
        "# ---- exit code: 0 done, 75 stopped early with a checkpoint (a chain's next job resumes),",
        "# anything else a failure. Under torchrun a rank that stopped early exits 0, so a clean",
        "# exit without the COMPLETED marker also means resumable.",
        "if run_completed; then",
        '  echo "[$(date -Is)] run complete"',
        "  exit 0",
        "fi",
        "if (( rc == 0 || rc == EXIT_CODE_RESUMABLE )); then",
        '  echo "[$(date -Is)] stopped early${STOP_SIGNAL:+ on SIG$STOP_SIGNAL} with a checkpoint; resubmit (or let the chain) resume"',
        '  exit "$EXIT_CODE_RESUMABLE"',
        "fi",
        'echo "[$(date -Is)] training failed (exit $rc)" >&2',
        'exit "$rc"',
    ]


def render_script(opts: SbatchOptions, run: RunPaths, job_name: str) -> str:
    opts.validate()
    sections: Sequence[List[str]] = (
        _header(opts, run, job_name),
        _settings(opts, run),
        _stop_trap(opts),
        _environment(opts, run),
        _rendezvous(run),
        _launch(opts, run),
        _wait_and_exit(),
    )
    return "\n".join(line for section in sections for line in section) + "\n"
