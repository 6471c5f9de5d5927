"""Running an AblationPlan locally: one training subprocess after another.

On SLURM the same plan is rendered and submitted by the `sbatch` front door
(`launch.sbatch.submit_plan`, reached through `nemotron-train ablate --slurm` or
`nemotron-train sbatch --arms`); this library does not know about schedulers.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from nemotron_train import rundir
from nemotron_train.ablation.plan import AblationPlan, AblationRun
from nemotron_train.rundir import PathLike, summary_file

PLAN_FILE = "ablation.json"

Runner = Callable[[List[str]], Any]  # returns an object with .returncode (subprocess.run)


def write_plan(plan: AblationPlan, root: Optional[PathLike] = None) -> Path:
    """Record the plan (commands, seeds) next to the runs, for reproducing them: in
    `root`, default `plan.output_root` (relative paths from the current directory)."""
    root = Path(plan.output_root if root is None else root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / PLAN_FILE
    path.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    return path


def is_finished(run: AblationRun) -> bool:
    """The trainer's summary says the run reached its step count without stopping early.

    The trainer writes `summary.json` when it stops: {"steps": N, "stopped_early": reason or null, ...}."""
    try:
        summary = json.loads(summary_file(run.output_dir).read_text())
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
    return [d for d in plan.run_dirs() if rundir.metrics_file(d).is_file()]
