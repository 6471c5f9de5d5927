"""The SLURM -> rank mapping: from SLURM's job environment to torch.distributed's.

Pure functions (host-list expansion, rank mapping, rendezvous port, environment and
torchrun command construction); `python -m launch.slurm_env` is the command-line entry
point that rendered batch scripts run under `srun`. Two ways to run ranks:

- one task per GPU (`--ntasks-per-node=G`): each task is a rank; `torch_env_from_slurm`
  maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK and adds the
  rendezvous address, and the entry point execs the training command with it:
  `srun python -m launch.slurm_env -- python -m nemotron_train train CONFIG ...`
- one task per node (`--ntasks-per-node=1`): each task runs torchrun (`torchrun_command`),
  which starts the node's G ranks and meets the other nodes at a c10d rendezvous on the
  first node:
  `srun python -m launch.slurm_env --mode per-node --nproc-per-node G -- -m nemotron_train train ...`

Host lists (`node[001-004,010],gpu-a[1-2]`) are expanded here in Python, so nothing depends
on `scontrol` being present (it usually is not inside a container).
"""

from __future__ import annotations

import os
import re
import sys
from itertools import product
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nemotron_train.errors import LaunchError

# Rendezvous ports come from the job id so that two jobs sharing a node (or a chain's next
# job, while the previous one's sockets linger in TIME_WAIT) do not collide. The range stays
# below Linux's ephemeral ports (32768+), which outgoing connections take at random.
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000
MAX_HOSTS = 1_000_000  # a typo like node[1-999999999] should fail, not exhaust memory

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"host list {text!r}: nested brackets are not valid")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"host list {text!r}: ']' without a matching '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"host list {text!r}: '[' without a matching ']'")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, spec: str) -> List[str]:
    """`001-004,010` -> ['001', '002', '003', '004', '010']; zero padding follows the lower bound."""
    out: List[str] = []
    for item in body.split(","):
        match = _RANGE_RE.match(item.strip())
        if not match:
            raise LaunchError(f"host list {spec!r}: {item!r} in [{body}] is not a number or a range like 1-4")
        lo_text, hi_text = match.group(1), match.group(2)
        lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
        if hi < lo:
            raise LaunchError(f"host list {spec!r}: range {item!r} runs backwards")
        if hi - lo + 1 > MAX_HOSTS:
            raise LaunchError(f"host list {spec!r}: range {item!r} has more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def _expand_pattern(pattern: str, spec: str) -> List[str]:
    """One host pattern, possibly with several bracket groups (`rack[1-2]-n[01-02]`)."""
    pieces = re.split(r"(\[[^\]]*\])", pattern)
    choices: List[List[str]] = []
    for piece in pieces:
        if piece.startswith("["):
            body = piece[1:-1]
            if not body.strip():
                raise LaunchError(f"host list {spec!r}: empty brackets")
            choices.append(_expand_range_set(body, spec))
        else:
            choices.append([piece])
    total = 1
    for c in choices:
        total *= len(c)
    if total > MAX_HOSTS:
        raise LaunchError(f"host list {spec!r} expands to more than {MAX_HOSTS} hosts")
    return ["".join(combo) for combo in product(*choices)]


def expand_hostlist(spec: str) -> List[str]:
    """Expand a SLURM host list: `node[001-004,010],gpu-a[1-2]` -> node001 .. node004, node010,
    gpu-a1, gpu-a2. Order is kept (the first host is SLURM's first node of the job)."""
    text = (spec or "").strip()
    if not text:
        raise LaunchError("host list is empty")
    hosts: List[str] = []
    for pattern in _split_top_level(text):
        pattern = pattern.strip()
        if not pattern:
            raise LaunchError(f"host list {spec!r}: empty entry between commas")
        hosts.extend(_expand_pattern(pattern, spec))
    return hosts


def expand_tasks_per_node(spec: str) -> List[int]:
    """SLURM's per-node task counts: `8(x4),2` -> [8, 8, 8, 8, 2]."""
    counts: List[int] = []
    for item in (spec or "").split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise LaunchError(f"tasks-per-node list {spec!r}: cannot read {item!r} (expected N or N(xM))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _require(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    raise LaunchError(f"{names[0]} is not set: this must run inside a SLURM job step (under srun)")


def _int_var(env: Mapping[str, str], *names: str) -> int:
    value = _require(env, *names)
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{names[0]}={value!r} is not an integer") from None


def job_nodes(env: Optional[Mapping[str, str]] = None) -> List[str]:
    env = os.environ if env is None else env
    return expand_hostlist(_require(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))


def rendezvous_port(job_id: int | str) -> int:
    """The job's rendezvous port, a function of the job id only (the batch script computes
    the same value in bash: RDZV_PORT_BASE + job_id % RDZV_PORT_SPAN)."""
    try:
        jid = int(str(job_id).split("_")[0])  # array tasks look like 1234_7
    except ValueError:
        raise LaunchError(f"SLURM job id {job_id!r} is not a number") from None
    return RDZV_PORT_BASE + jid % RDZV_PORT_SPAN


def rendezvous_endpoint(env: Optional[Mapping[str, str]] = None, port: Optional[int] = None) -> Tuple[str, int]:
    """(first node of the job, port): where rank 0 / the c10d store listens."""
    env = os.environ if env is None else env
    if port is None:
        port = rendezvous_port(_require(env, "SLURM_JOB_ID", "SLURM_JOBID"))
    return job_nodes(env)[0], port


def _local_world_size(env: Mapping[str, str], node_id: int) -> int:
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = expand_tasks_per_node(spec)
        if node_id < len(counts):
            return counts[node_id]
    return _int_var(env, "SLURM_NTASKS_PER_NODE")


def torch_env_from_slurm(
    env: Optional[Mapping[str, str]] = None,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
) -> Dict[str, str]:
    """torch.distributed variables for one-task-per-GPU: this task is rank SLURM_PROCID of
    SLURM_NTASKS, local rank SLURM_LOCALID (its GPU index on the node)."""
    env = os.environ if env is None else env
    rank = _int_var(env, "SLURM_PROCID")
    world = _int_var(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    local_rank = _int_var(env, "SLURM_LOCALID")
    node_id = _int_var(env, "SLURM_NODEID")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside 0..{world - 1} (SLURM_NTASKS={world})")
    addr, port = rendezvous_endpoint(env, master_port)
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(_local_world_size(env, node_id)),
        "NODE_RANK": str(node_id),
        "GROUP_RANK": str(node_id),
        "MASTER_ADDR": master_addr or addr,
        "MASTER_PORT": str(port),
    }


def torchrun_args(
    nnodes: int | str,
    nproc_per_node: int | str,
    node_rank: int | str,
    rdzv_host: str,
    rdzv_port: int | str,
    rdzv_id: int | str,
) -> List[str]:
    """torchrun's options for one task per node. Values may be shell references such as
    `$SLURM_NODEID`; the batch-script renderer passes those, `torchrun_command` real values."""
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_host}:{rdzv_port}",
        f"--rdzv-id={rdzv_id}",
    ]


def _is_python(program: str) -> bool:
    return re.fullmatch(r"python[0-9.]*", os.path.basename(program)) is not None


def torchrun_command(
    nproc_per_node: int,
    command: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
    python: str = sys.executable,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
) -> List[str]:
    """The torchrun command line for this node of the job (one task per node).

    `command` is what each rank runs: `-m pkg args`, `script.py args`, or a full command
    (`python -m pkg args` has its interpreter dropped; anything else runs with --no-python).
    """
    env = os.environ if env is None else env
    if nproc_per_node < 1:
        raise LaunchError(f"nproc_per_node={nproc_per_node}: must be at least 1")
    if not command:
        raise LaunchError("no command to run: put it after `--`")
    nnodes = _int_var(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    node_rank = _int_var(env, "SLURM_NODEID")
    addr, port = rendezvous_endpoint(env, master_port)
    job_id = _require(env, "SLURM_JOB_ID", "SLURM_JOBID")
    args = torchrun_args(nnodes, nproc_per_node, node_rank, master_addr or addr, port, job_id)
    cmd = list(command)
    if _is_python(cmd[0]):
        cmd = cmd[1:]
    elif not (cmd[0] == "-m" or cmd[0].endswith(".py")):
        args.append("--no-python")
    return [python, "-m", "torch.distributed.run", *args, *cmd]
