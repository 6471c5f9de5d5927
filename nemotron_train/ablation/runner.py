"""Running an AblationPlan: locally (one training subprocess after another) or via SLURM."""

from __future__ import annotations

import importlib
import json
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List

from nemotron_train.ablation.metrics import METRICS_FILE
from nemotron_train.ablation.plan import AblationPlan, AblationRun
from nemotron_train.config.loader import ConfigError

PLAN_FILE = "ablation.json"
# Written by the trainer when it stops: {"steps": N, "stopped_early": reason or null, ...}.
FINISHED_MARKER = "summary.json"

Runner = Callable[[List[str]], Any]  # returns an object with .returncode (subprocess.run)


def write_plan(plan: AblationPlan) -> Path:
    """Record the plan (commands, seeds) next to the runs, for reproducing them."""
    root = Path(plan.output_root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / PLAN_FILE
    path.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    return path


def is_finished(run: AblationRun) -> bool:
    """The trainer's summary says the run reached its step count without stopping early."""
    try:
        summary = json.loads((Path(run.output_dir) / FINISHED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("stopped_early"):
        return False
    steps = summary.get("steps")
    return isinstance(steps, int) and steps >= run.train_steps


def run_plan(
    plan: AblationPlan,
    runner: Runner = subprocess.run,
    keep_going: bool = False,
    rerun: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, int]:
    """Run each training command in order; returns {run label: exit code}.

    Stops at the first failure unless `keep_going`. A finished run (`is_finished`) is
    skipped unless `rerun`; an unfinished one is simply started again, and the trainer
    resumes it from its latest checkpoint."""
    write_plan(plan)
    results: Dict[str, int] = {}
    for run in plan.runs:
        if not rerun and is_finished(run):
            log(f"[ablate] {run.label}: already finished ({run.train_steps} steps); skipping (--rerun to redo)")
            results[run.label] = 0
            continue
        log(f"[ablate] {run.label}: {shlex.join(run.command)}")
        rc = int(runner(list(run.command)).returncode)
        results[run.label] = rc
        if rc != 0:
            log(f"[ablate] {run.label} failed with exit code {rc}")
            if not keep_going:
                break
    return results


def runs_with_metrics(plan: AblationPlan) -> List[str]:
    return [d for d in plan.run_dirs() if (Path(d) / METRICS_FILE).is_file()]


def submit_slurm(plan: AblationPlan) -> Any:
    """Hand the plan to `launch.sbatch.submit_ablation(plan)` (an optional component)."""
    try:
        module = importlib.import_module("launch.sbatch")
    except ModuleNotFoundError as exc:
        if exc.name not in ("launch", "launch.sbatch"):
            raise  # a real missing dependency of the launcher, not an absent launcher
        module = None
    submit = getattr(module, "submit_ablation", None)
    if submit is None:
        raise ConfigError(
            "--slurm: this installation has no SLURM ablation launcher (launch.sbatch.submit_ablation). "
            "Run without --slurm to train the arms here one after another, or use --dry-run to print "
            "each run's command and submit them yourself"
        )
    write_plan(plan)
    return submit(plan)
