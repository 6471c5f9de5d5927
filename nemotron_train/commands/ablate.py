"""`nemotron-train ablate` and `nemotron-train compare`.

    nemotron-train ablate CONFIG --arms bf16,fp8 [--seeds K] [key=value ...]
    nemotron-train ablate CONFIG --arms bf16,fp8 --slurm --nodes N --gpus-per-node G --time HH:MM:SS [sbatch options]
    nemotron-train compare RUN_DIR... [--output DIR] [--baseline LABEL]

Options and overrides may be given in any order. This module is imported on every CLI
start, so it imports nothing heavy at module level.

The plan of runs comes from the ablation library (nemotron_train.ablation.plan), which
trains it here one run after another (nemotron_train.ablation.runner) and knows nothing of
schedulers. With --slurm the plan goes to the `sbatch` front door instead
(`launch.sbatch.submit_plan`, the code path of `nemotron-train sbatch --arms`), with the
same sbatch options (`launch.sbatch.add_sbatch_options`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from nemotron_train.cli import IntermixedParser


def register(subparsers: Any) -> None:
    from launch.sbatch import add_sbatch_options
    from nemotron_train.ablation.plan import ARMS

    p = subparsers.add_parser(
        "ablate",
        help="train arms (e.g. bf16 vs fp8) with identical init and data order, then compare them",
        description=(
            "Runs `nemotron-train train CONFIG` once per arm and seed, in <output-root>/<arm>_s<k>, with the same "
            "train.seed (base + k) for every arm, then writes <output-root>/report.md. On CPU the bf16 arm trains "
            "in precision.params_dtype with FP8 off."
        ),
    )
    p.__class__ = IntermixedParser
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run")
    p.add_argument("--arms", default="bf16,fp8", help=f"comma-separated arms from: {', '.join(ARMS)} (default bf16,fp8)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm: train.seed, train.seed+1, ... (default 1)")
    p.add_argument("--name", help="ablation name: wandb group and directory (default <run.name>-<arm>-vs-<arm>)")
    p.add_argument("--output-root", help="where the runs go (default: next to run.output_dir, named --name)")
    p.add_argument("--slurm", action="store_true",
                   help="submit one SLURM batch job (chain) per run instead, as `nemotron-train sbatch --arms` does; "
                        "needs --nodes, --time and --gpus-per-node (or --cpu)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the training commands and exit (with --slurm: render the batch scripts, submit nothing)")
    p.add_argument("--keep-going", action="store_true", help="run the remaining arms after a failure")
    p.add_argument("--rerun", action="store_true", help="also rerun runs that already finished")
    slurm_options = add_sbatch_options(p, required=False, title="--slurm: ")
    p.set_defaults(func=ablate_main, slurm_options=slurm_options)

    c = subparsers.add_parser(
        "compare",
        help="Markdown report + loss plot comparing runs' metrics.jsonl",
        description="Writes report.md and loss_curves.png; runs are labelled by their directory names.",
    )
    c.__class__ = IntermixedParser
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run.output_dir of each run (files, e.g. a previous report.md, are ignored)")
    c.add_argument("--output", help="report directory (default: the runs' common parent directory)")
    c.add_argument("--baseline", help="label (directory name) of the baseline run (default: bf16 arm, else first)")
    c.set_defaults(func=compare_main)


def ablate_main(args: argparse.Namespace) -> int:
    from nemotron_train.ablation.plan import build_plan, parse_arms
    from nemotron_train.ablation.report import compare_runs
    from nemotron_train.ablation.runner import run_plan, runs_with_metrics
    from nemotron_train.errors import ConfigError

    plan = build_plan(
        args.config,
        parse_arms(args.arms),
        seeds=args.seeds,
        user_overrides=args.overrides,
        name=args.name,
        output_root=args.output_root,
    )
    if args.slurm:
        return _submit_slurm(plan, args)
    given = [flag for flag, (dest, default) in getattr(args, "slurm_options", {}).items() if getattr(args, dest) != default]
    if given:
        raise ConfigError(f"{', '.join(given)}: SLURM options, used only with --slurm; add --slurm or drop them")
    if args.dry_run:
        for run in plan.runs:
            print(shlex.join(run.command))
        return 0
    results = run_plan(plan, keep_going=args.keep_going, rerun=args.rerun)
    failed = [label for label, rc in results.items() if rc != 0]
    not_run = [r.label for r in plan.runs if r.label not in results]
    done = runs_with_metrics(plan)
    if done:
        print(f"[ablate] report: {compare_runs(done, output=plan.output_root)}")
    if failed or not_run:
        print(f"[ablate] failed: {', '.join(failed)}; not run: {', '.join(not_run) or 'none'}", file=sys.stderr)
        return 1
    return 0


def _submit_slurm(plan: Any, args: argparse.Namespace) -> int:
    """--slurm: render (and unless --dry-run submit) one batch job per planned run."""
    from launch.sbatch import report_job, sbatch_options, submit_plan
    jobs = submit_plan(plan, sbatch_options(args), submit_jobs=not args.dry_run)
    for job in jobs:
        report_job(job)
    run_dirs = [str(job.run_dir) for job in jobs]
    verb = "rendered" if args.dry_run else "submitted"
    print(f"[ablate] {verb} {len(jobs)} runs of {plan.name}")
    print(f"[ablate] when they finish: nemotron-train compare {shlex.join(run_dirs)} --output {os.path.dirname(run_dirs[0])}")
    return 0


def compare_main(args: argparse.Namespace) -> int:
    from nemotron_train.ablation.report import compare_runs

    print(compare_runs(args.runs, output=args.output, baseline=args.baseline))
    return 0
