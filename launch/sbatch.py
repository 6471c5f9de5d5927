"""`nemotron-train sbatch`: render (and optionally submit) a SLURM batch script for a run.

    nemotron-train sbatch CONFIG --nodes N --gpus-per-node G --time HH:MM:SS
        [--partition P] [--account A] [--container-image I] [--container-mounts M]
        [--chain K] [--job-name J] [--mode per-node|per-gpu] [--signal USR1@120]
        [--submit [--wait]] [--output PATH] [key=value overrides ...]
        [--arms bf16,fp8 --seeds S1,S2 [--name NAME] [--output-root DIR]]

The resolved config (file + overrides) is copied into `<run.output_dir>/sbatch/` and the job
trains from that copy, so editing the original later does not change a queued job. The
script goes to `<run.output_dir>/sbatch/<job>.sbatch` (or --output); its path is printed.
`--chain K` submits it K times under one job name with `--dependency=singleton`: each job
runs after the previous one ends and resumes from its checkpoint; once the run is complete
the remaining jobs exit at once. `--submit --wait` blocks until the job (chain) ends,
printing each job's log, and exits with the last job's exit code. `--arms bf16,fp8 --seeds 1,2` renders an FP8-vs-BF16
ablation instead: the plan of `nemotron-train ablate` (nemotron_train.ablation.plan: arms,
seeds, run names and directories), one job per planned run (see `submit_plan`, which
`nemotron-train ablate --slurm` calls too, with the same options: `add_sbatch_options`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from launch.sbatch_script import (
    MODES, RunPaths, SbatchOptions, check_text, forwarded_signal, parse_signal, render_script, sbatch_word,
)
from nemotron_train.ablation.plan import ARMS, AblationPlan, build_plan, parse_arms
from nemotron_train.ablation.runner import write_plan
from nemotron_train.cli import IntermixedParser
from nemotron_train.config.loader import load_config, save_config
from nemotron_train.config.schema import Config
from nemotron_train.config.validate import validate_config
from nemotron_train.errors import LaunchError
from nemotron_train.rundir import PathLike, logs_dir, sbatch_dir
from nemotron_train.training.stop import exit_signal_names


@dataclass
class RenderedJob:
    script: Path
    config: Path  # the snapshot the job trains from
    job_name: str
    run_dir: Path
    job_ids: List[str] = field(default_factory=list)


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not safe:
        raise LaunchError(f"job name {name!r} has no usable characters; pass --job-name")
    return safe


def _no_whitespace(what: str, path: Path) -> None:
    # #SBATCH lines are not shell-parsed: a path with spaces cannot be written there.
    if re.search(r"\s", str(path)):
        raise LaunchError(f"{what} {str(path)!r} contains whitespace, which #SBATCH options cannot hold")


def _snapshot_path(directory: Path, name: str) -> Path:
    """A new file per rendering: a queued job keeps reading the snapshot it was rendered with."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = directory / f"{name}.{stamp}.yaml"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{name}.{stamp}-{n}.yaml"
    return path


def _check_signal(opts: SbatchOptions, cfg: Config) -> None:
    sig, _ = parse_signal(opts.signal)
    forward = "SIG" + forwarded_signal(sig)
    handled = exit_signal_names(cfg.train.exit_signal)
    if forward not in handled:
        raise LaunchError(
            f"--signal {opts.signal}: the batch script forwards {forward}, but the trainer stops only on "
            f"{', '.join(handled)}; set train.exit_signal={forward} or use --signal USR1@{parse_signal(opts.signal)[1]}"
        )


def load_run_config(config: PathLike, overrides: Sequence[str], opts: SbatchOptions) -> Config:
    """The run's config as the job will see it, checked for the job's world size."""
    opts.validate()
    launch = [f"launch.nnodes={opts.nodes}", f"launch.nproc_per_node={opts.ranks_per_node}"]
    cfg = load_config(config, [*overrides, *launch])
    validate_config(cfg, opts.nodes * opts.ranks_per_node)
    _check_signal(opts, cfg)
    return cfg


def render_job(
    config: PathLike,
    overrides: Sequence[str],
    opts: SbatchOptions,
    output: Optional[PathLike] = None,
) -> RenderedJob:
    """Resolve the config, snapshot it into the run dir, and write the sbatch script."""
    cfg = load_run_config(config, overrides, opts)
    workdir = Path(opts.workdir or os.getcwd()).resolve()
    run_dir = (workdir / cfg.run.output_dir).resolve()
    # The ranks resolve relative paths from the job's working directory; the run dir is
    # made absolute so the script's COMPLETED check and the trainer agree whatever the cwd.
    cfg.run.output_dir = str(run_dir)
    job_name = opts.job_name or cfg.run.name
    # Checked before anything is written: the name goes into #SBATCH lines and file names.
    sbatch_word("--job-name" if opts.job_name else "run.name (or pass --job-name)", job_name)
    check_text("the config path", config)
    safe = _safe_name(job_name)
    for what, path in (("run.output_dir", run_dir), ("working directory", workdir)):
        _no_whitespace(what, path)
    if cfg.launch.max_restarts and opts.mode == "per-gpu":
        raise LaunchError("launch.max_restarts needs torchrun on each node (--mode per-node); --mode per-gpu has no restarter")
    snapshot_dir = sbatch_dir(run_dir)
    snapshot = _snapshot_path(snapshot_dir, safe)
    save_config(cfg, snapshot)
    logs_dir(run_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create --output dirs
    paths = RunPaths(config=str(snapshot), run_dir=str(run_dir), workdir=str(workdir), train_steps=cfg.train.steps,
                     source=str(config), socket_ifname=cfg.launch.socket_ifname, max_restarts=cfg.launch.max_restarts)
    text = render_script(opts, paths, job_name)
    script = Path(output) if output is not None else snapshot_dir / f"{safe}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    return RenderedJob(script=script, config=snapshot, job_name=job_name, run_dir=run_dir)


def submit(
    script: PathLike,
    count: int = 1,
    env: Optional[Mapping[str, str]] = None,
    sbatch: str = "sbatch",
) -> List[str]:
    """Submit `script` `count` times; returns the job ids. A chain relies on the script's
    `--dependency=singleton` and job name: SLURM runs same-name jobs one after another."""
    if shutil.which(sbatch, path=(env or os.environ).get("PATH")) is None:
        raise LaunchError(f"`{sbatch}` not found: --submit needs the SLURM client on PATH (or submit the script yourself)")
    ids = []
    for _ in range(count):
        result = subprocess.run([sbatch, "--parsable", str(script)], env=dict(env) if env else None, capture_output=True, text=True)
        if result.returncode != 0:
            raise LaunchError(f"sbatch {script} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        ids.append(result.stdout.strip().split(";")[0])
    return ids


TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


def job_log(job: RenderedJob, job_id: str) -> Path:
    """Where a job's output goes (the script's `#SBATCH --output`: <run dir>/logs/%x-%j.out)."""
    return logs_dir(job.run_dir) / f"{job.job_name}-{job_id}.out"


def job_state(job_id: str, env: Optional[Mapping[str, str]] = None, scontrol: str = "scontrol") -> Tuple[str, int]:
    """(state, exit code of the batch script) of a job, from `scontrol show job`."""
    result = subprocess.run([scontrol, "show", "job", "-o", job_id], env=dict(env) if env else None,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"scontrol show job {job_id} failed: {result.stderr.strip() or result.stdout.strip()} "
                          "(the controller forgets a job MinJobAge seconds after it ends)")
    fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
    code = fields.get("ExitCode", "0:0").partition(":")[0]
    return fields.get("JobState", "UNKNOWN"), int(code or 0)


def wait_for_jobs(job: RenderedJob, env: Optional[Mapping[str, str]] = None, poll_s: float = 2.0) -> int:
    """Block until every job of `job` (a chain: in order) has ended, printing each one's end
    and log; returns the exit code of the last one, which is the chain's outcome (0 done,
    75 stopped early and resumable, anything else a failure)."""
    code = 0
    for job_id in job.job_ids:
        state, code = job_state(job_id, env)
        while state not in TERMINAL_STATES:
            time.sleep(poll_s)
            state, code = job_state(job_id, env)
        print(f"job {job_id} {state}, exit code {code}: log {job_log(job, job_id)}", flush=True)
    return code


def submit_plan(
    plan: AblationPlan,
    sbatch_args: SbatchOptions,
    submit_jobs: bool = True,
    env: Optional[Mapping[str, str]] = None,
) -> List[RenderedJob]:
    """Render, and unless `submit_jobs` is False submit, one job (a chain of
    `sbatch_args.chain`) per run of an ablation plan (`nemotron_train.ablation.plan`).

    Each job trains its run's overrides (arm, train.seed, run dir, wandb group) in the run's
    directory, under the job name `plan.job_name(run, sbatch_args.job_name)`. Every job is
    rendered before any is submitted, so a run whose config or layout fails submits nothing.
    The plan is recorded in `<output root>/ablation.json`, as a local `ablate` records it.
    """
    jobs = [
        render_job(plan.config, run.overrides, replace(sbatch_args, job_name=plan.job_name(run, sbatch_args.job_name)))
        for run in plan.runs
    ]
    # Relative run dirs resolve from the job's working directory (see render_job).
    write_plan(plan, Path(sbatch_args.workdir or os.getcwd()).resolve() / plan.output_root)
    if submit_jobs:
        for job in jobs:
            job.job_ids = submit(job.script, sbatch_args.chain, env=env)
    return jobs


# --------------------------------------------------------------------------- command line


def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None

    return parse


def add_sbatch_options(parser: argparse.ArgumentParser, required: bool = True, title: str = "") -> Dict[str, Tuple[str, Any]]:
    """The allocation and job options of a batch job, as `nemotron-train sbatch` has them;
    `nemotron-train ablate --slurm` adds the same ones (`required=False`: they only matter
    with --slurm, and `sbatch_options` names a missing one). `title` prefixes the groups.
    Returns {option: (dest, default)} of what it added."""
    actions: List[argparse.Action] = []
    allocation = parser.add_argument_group(f"{title}allocation")
    job = parser.add_argument_group(f"{title}job")

    def g(*args: Any, **kw: Any) -> None:
        actions.append(allocation.add_argument(*args, **kw))

    def j(*args: Any, **kw: Any) -> None:
        actions.append(job.add_argument(*args, **kw))

    g("--nodes", type=int, required=required)
    g("--gpus-per-node", type=int, default=None, help="GPUs per node (0 = CPU ranks, with --nproc-per-node)")
    g("--cpu", action="store_true", help="CPU ranks: same as --gpus-per-node 0")
    g("--nproc-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node)")
    g("--time", required=required, help="time limit, HH:MM:SS")
    g("--partition")
    g("--account")
    g("--cpus-per-task", type=int)
    g("--exclusive", action="store_true", help="whole nodes only")
    g("--sbatch-option", dest="extra_sbatch", action="append", default=[], metavar="OPT",
      help="another #SBATCH option, e.g. --sbatch-option=--qos=high (repeatable)")
    j("--job-name", help="default: run.name; an ablation's jobs are <job-name or ablation name>-<run label>")
    j("--mode", choices=MODES, default="per-node",
      help="per-node: torchrun on each node (default); per-gpu: one srun task per GPU")
    j("--signal", default="USR1@120", help="stop signal and seconds before the time limit (default USR1@120)")
    j("--chain", type=int, default=1, help="submit K jobs that run one after another (singleton)")
    j("--container-image", help="pyxis/enroot image for the ranks")
    j("--container-mounts", help="pyxis mounts, SRC:DST[,SRC:DST...]")
    j("--python", default="python", help="interpreter the ranks run (default: python on PATH)")
    j("--workdir", help="the job's working directory (default: the current directory)")
    j("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job (repeatable)")
    return {a.option_strings[0]: (a.dest, a.default) for a in actions}


def register(subparsers) -> None:
    p = subparsers.add_parser("sbatch", help="render (and submit) a SLURM batch script for a run",
                              description=__doc__.split("\n\n")[0])
    p.__class__ = IntermixedParser
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides baked into the job's config")
    add_sbatch_options(p)
    o = p.add_argument_group("output")
    o.add_argument("--output", help="script path (default: <run.output_dir>/sbatch/<job>.sbatch)")
    o.add_argument("--submit", action="store_true", help="submit with sbatch and print the job ids")
    o.add_argument("--wait", action="store_true",
                   help="with --submit: block until the job (or chain) ends and exit with its exit code (0 done, 75 stopped early)")
    a = p.add_argument_group("ablation (the plan of `nemotron-train ablate`, one job per run)")
    a.add_argument("--arms", help=f"comma-separated arms, one job per arm and seed: {', '.join(ARMS)}")
    a.add_argument("--seeds", type=_csv(int), help="comma-separated train.seed values for --arms")
    a.add_argument("--name", "--group", dest="name",
                   help="ablation name: wandb group and directory (default <run.name>-<arm>-vs-<arm>)")
    a.add_argument("--output-root", help="where the runs go, <root>/<arm>_s<k> (default: next to run.output_dir, named --name)")
    p.set_defaults(func=main)


def sbatch_options(args: argparse.Namespace) -> SbatchOptions:
    """SbatchOptions from the arguments `add_sbatch_options` defines; ValueError for a missing
    or contradictory one."""
    missing = [flag for flag, value in (("--nodes N", args.nodes), ("--time HH:MM:SS", args.time)) if value is None]
    if missing:
        raise LaunchError(f"a SLURM job needs {' and '.join(missing)}")
    gpus = 0 if args.cpu else args.gpus_per_node
    if gpus is None:
        raise LaunchError("give --gpus-per-node G (or --cpu / --gpus-per-node 0 with --nproc-per-node N for CPU ranks)")
    if args.cpu and args.gpus_per_node:
        raise LaunchError("--cpu contradicts --gpus-per-node; use one")
    return SbatchOptions(
        nodes=args.nodes, gpus_per_node=gpus, time=args.time, nproc_per_node=args.nproc_per_node,
        mode=args.mode, partition=args.partition, account=args.account, job_name=args.job_name,
        container_image=args.container_image, container_mounts=args.container_mounts, chain=args.chain,
        signal=args.signal, cpus_per_task=args.cpus_per_task, exclusive=args.exclusive, python=args.python,
        workdir=args.workdir, env=list(args.env), extra_sbatch=list(args.extra_sbatch),
    )


def report_job(job: RenderedJob) -> None:
    """Print the script path, then one line per submitted job id and its log."""
    print(job.script)
    for job_id in job.job_ids:
        print(f"submitted {job.job_name}: job {job_id}")
        print(f"  log: {job_log(job, job_id)}")


def main(args: argparse.Namespace) -> int:
    # Bad options raise LaunchError / ConfigError: the command line reports them (exit 2).
    opts = sbatch_options(args)
    if args.wait and not args.submit:
        raise LaunchError("--wait waits for submitted jobs: add --submit")
    if bool(args.arms) != bool(args.seeds):
        raise LaunchError("an ablation needs both --arms and --seeds")
    if args.arms:
        if args.output:
            raise LaunchError("--output names one script; an ablation writes one per arm and seed into each run dir")
        plan = build_plan(args.config, parse_arms(args.arms), seeds=args.seeds, user_overrides=args.overrides,
                          name=args.name, output_root=args.output_root)
        jobs = submit_plan(plan, opts, submit_jobs=args.submit)
    else:
        if args.name or args.output_root:
            raise LaunchError("--name and --output-root place the runs of an ablation: use them with --arms and --seeds")
        job = render_job(args.config, args.overrides, opts, args.output)
        if args.submit:
            job.job_ids = submit(job.script, opts.chain)
        jobs = [job]
    for job in jobs:
        report_job(job)
    if args.wait:
        sys.stdout.flush()
        codes = [wait_for_jobs(job) for job in jobs]
        return next((code for code in codes if code != 0), 0)
    return 0
