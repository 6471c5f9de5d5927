"""`nemotron-train sbatch`: render (and optionally submit) a SLURM batch script for a run.

    nemotron-train sbatch CONFIG --nodes N --gpus-per-node G --time HH:MM:SS
        [--partition P] [--account A] [--container-image I] [--container-mounts M]
        [--chain K] [--job-name J] [--mode per-node|per-gpu] [--signal USR1@120]
        [--submit] [--output PATH] [key=value overrides ...]

The resolved config (file + overrides) is copied into `<run.output_dir>/sbatch/` and the job
trains from that copy, so editing the original later does not change a queued job. The
script goes to `<run.output_dir>/sbatch/<job>.sbatch` (or --output); its path is printed.
`--chain K` submits it K times under one job name with `--dependency=singleton`: each job
runs after the previous one ends and resumes from its checkpoint; once the run is complete
the remaining jobs exit at once. `--arms bf16,fp8 --seeds 1,2` renders an FP8-vs-BF16
ablation instead: one job per arm and seed (see `submit_ablation`).
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
from typing import Dict, List, Mapping, Optional, Sequence, Union

from launch.sbatch_script import MODES, RunPaths, SbatchOptions, forwarded_signal, parse_signal, render_script
from launch.signals import exit_signal_names
from nemotron_train.config.loader import load_config, save_config
from nemotron_train.config.schema import Config
from nemotron_train.config.validate import FP8_RECIPES, validate_config

PathLike = Union[str, os.PathLike]

# Ablation arms: name -> overrides. Every arm of one seed shares train.seed, hence the same
# initialisation and data order, so the arms differ only in precision.
ARM_OVERRIDES: Dict[str, List[str]] = {
    "bf16": ["precision.fp8.enabled=false"],
    "fp8": ["precision.fp8.enabled=true"],
    **{f"fp8-{r}": ["precision.fp8.enabled=true", f"precision.fp8.recipe={r}"] for r in FP8_RECIPES},
}


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
        raise ValueError(f"job name {name!r} has no usable characters; pass --job-name")
    return safe


def _no_whitespace(what: str, path: Path) -> None:
    # #SBATCH lines are not shell-parsed: a path with spaces cannot be written there.
    if re.search(r"\s", str(path)):
        raise ValueError(f"{what} {str(path)!r} contains whitespace, which #SBATCH options cannot hold")


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
        raise ValueError(
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
    safe = _safe_name(job_name)
    for what, path in (("run.output_dir", run_dir), ("working directory", workdir)):
        _no_whitespace(what, path)
    sbatch_dir = run_dir / "sbatch"
    snapshot = _snapshot_path(sbatch_dir, safe)
    save_config(cfg, snapshot)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create --output dirs
    paths = RunPaths(config=str(snapshot), run_dir=str(run_dir), workdir=str(workdir), train_steps=cfg.train.steps, source=str(config))
    text = render_script(opts, paths, job_name)
    script = Path(output) if output is not None else sbatch_dir / f"{safe}.sbatch"
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
        raise ValueError(f"`{sbatch}` not found: --submit needs the SLURM client on PATH (or submit the script yourself)")
    ids = []
    for _ in range(count):
        result = subprocess.run([sbatch, "--parsable", str(script)], env=dict(env) if env else None, capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"sbatch {script} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        ids.append(result.stdout.strip().split(";")[0])
    return ids


def submit_ablation(
    config: PathLike,
    arms: Sequence[str],
    seeds: Sequence[int],
    sbatch_args: SbatchOptions,
    overrides: Sequence[str] = (),
    group: Optional[str] = None,
    submit_jobs: bool = True,
    env: Optional[Mapping[str, str]] = None,
) -> List[RenderedJob]:
    """Render, and unless `submit_jobs` is False submit, one job (a chain of
    `sbatch_args.chain`) per (arm, seed), e.g. arms ("bf16", "fp8") x seeds (1234, 1235).

    Each job gets its own run dir `<run.output_dir>/<arm>-s<seed>` and job name, shares
    train.seed (initialisation and data order) with the other arms of its seed, and logs to
    the wandb group `group` (default `<run.name>-ablation`) so the arms plot together.
    """
    unknown = [a for a in arms if a not in ARM_OVERRIDES]
    if unknown or not arms:
        raise ValueError(f"ablation arms {list(arms)!r}: choose from {', '.join(ARM_OVERRIDES)}")
    if not seeds:
        raise ValueError("ablation needs at least one seed")
    base = load_config(config, overrides)
    group = group or f"{base.run.name}-ablation"
    job_base = sbatch_args.job_name or base.run.name
    jobs = []
    for seed in seeds:
        for arm in arms:
            tag = f"{arm}-s{seed}"
            arm_overrides = [
                *overrides, *ARM_OVERRIDES[arm], f"train.seed={seed}",
                f"run.name={base.run.name}-{tag}", f"run.output_dir={base.run.output_dir}/{tag}",
                f"logging.wandb.group={group}",
            ]
            job = render_job(config, arm_overrides, replace(sbatch_args, job_name=f"{job_base}-{tag}"))
            if submit_jobs:
                job.job_ids = submit(job.script, sbatch_args.chain, env=env)
            jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- command line


class _IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides follow options (`CONFIG --nodes 2 train.steps=10`), which
    plain argparse rejects once a `*` positional has matched empty before the options."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser("sbatch", help="render (and submit) a SLURM batch script for a run",
                              description=__doc__.split("\n\n")[0])
    p.__class__ = _IntermixedParser
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides baked into the job's config")
    g = p.add_argument_group("allocation")
    g.add_argument("--nodes", type=int, required=True)
    g.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (0 = CPU ranks, with --nproc-per-node)")
    g.add_argument("--cpu", action="store_true", help="CPU ranks: same as --gpus-per-node 0")
    g.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node)")
    g.add_argument("--time", required=True, help="time limit, HH:MM:SS")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--sbatch-option", dest="extra_sbatch", action="append", default=[], metavar="OPT",
                   help="another #SBATCH option, e.g. --sbatch-option=--qos=high (repeatable)")
    j = p.add_argument_group("job")
    j.add_argument("--job-name", help="default: run.name")
    j.add_argument("--mode", choices=MODES, default="per-node",
                   help="per-node: torchrun on each node (default); per-gpu: one srun task per GPU")
    j.add_argument("--signal", default="USR1@120", help="stop signal and seconds before the time limit (default USR1@120)")
    j.add_argument("--chain", type=int, default=1, help="submit K jobs that run one after another (singleton)")
    j.add_argument("--container-image", help="pyxis/enroot image for the ranks")
    j.add_argument("--container-mounts", help="pyxis mounts, SRC:DST[,SRC:DST...]")
    j.add_argument("--python", default="python", help="interpreter the ranks run (default: python on PATH)")
    j.add_argument("--workdir", help="the job's working directory (default: the current directory)")
    j.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job (repeatable)")
    j.add_argument("--output", help="script path (default: <run.output_dir>/sbatch/<job>.sbatch)")
    j.add_argument("--submit", action="store_true", help="submit with sbatch and print the job ids")
    a = p.add_argument_group("ablation")
    a.add_argument("--arms", type=_csv(str), help=f"render one job per arm and seed; arms: {', '.join(ARM_OVERRIDES)}")
    a.add_argument("--seeds", type=_csv(int), help="comma-separated train.seed values for --arms")
    a.add_argument("--group", help="wandb group of the ablation (default: <run.name>-ablation)")
    p.set_defaults(func=main)


def _options(args: argparse.Namespace) -> SbatchOptions:
    gpus = 0 if args.cpu else args.gpus_per_node
    if gpus is None:
        raise ValueError("give --gpus-per-node G (or --cpu / --gpus-per-node 0 with --nproc-per-node N for CPU ranks)")
    if args.cpu and args.gpus_per_node:
        raise ValueError("--cpu contradicts --gpus-per-node; use one")
    return SbatchOptions(
        nodes=args.nodes, gpus_per_node=gpus, time=args.time, nproc_per_node=args.nproc_per_node,
        mode=args.mode, partition=args.partition, account=args.account, job_name=args.job_name,
        container_image=args.container_image, container_mounts=args.container_mounts, chain=args.chain,
        signal=args.signal, cpus_per_task=args.cpus_per_task, exclusive=args.exclusive, python=args.python,
        workdir=args.workdir, env=list(args.env), extra_sbatch=list(args.extra_sbatch),
    )


def _report(job: RenderedJob) -> None:
    print(job.script)
    for job_id in job.job_ids:
        print(f"submitted {job.job_name}: job {job_id}")


def main(args: argparse.Namespace) -> int:
    try:
        opts = _options(args)
        if bool(args.arms) != bool(args.seeds):
            raise ValueError("an ablation needs both --arms and --seeds")
        if args.arms:
            if args.output:
                raise ValueError("--output names one script; an ablation writes one per arm and seed into each run dir")
            jobs = submit_ablation(args.config, args.arms, args.seeds, opts, args.overrides, args.group, submit_jobs=args.submit)
        else:
            job = render_job(args.config, args.overrides, opts, args.output)
            if args.submit:
                job.job_ids = submit(job.script, opts.chain)
            jobs = [job]
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"nemotron-train sbatch: error: {exc}", file=sys.stderr)
        return 2
    for job in jobs:
        _report(job)
    return 0
