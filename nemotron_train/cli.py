"""`nemotron-train` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)` adding its parser with `set_defaults(func=handler)`; handler(args) -> int."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional

# Modules that register subcommands, in help order. A module that fails to import is a bug.
COMMAND_MODULES = [
    "nemotron_train.training.cli",  # train
    "nemotron_train.plan",  # plan
    "data_tools.cli",  # preprocess, inspect, prepare-cache
    "nemotron_train.checkpoint.cli",  # export-hf, import-hf, score
    "nemotron_train.ablation.cli",  # ablate, compare
    "launch.sbatch",  # sbatch
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemotron-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Skip only a command package that is not installed; a missing dependency is a bug.
            if not (name == exc.name or name.startswith(f"{exc.name}.")):
                raise
            continue
        module.register(sub)
    return parser


def _quiet_known_warnings() -> None:
    """Warnings about optional fused kernels say nothing actionable on every rank's start."""
    for pattern in (
        "Transformer Engine and Apex are not installed",
        "full scope is deprecated",
        "Apex is not installed",
        # mcore's DDP reads `.grad` of views and uses the older reduce-scatter name; both benign.
        "is not a leaf Tensor is being accessed",
        "`torch.distributed.[a-z_]+` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=f".*{pattern}")


def _report_user_error(command: str, exc: Exception) -> None:
    """One message, printed once: by rank 0 when ranks are running (every rank raises the same
    error from the same config), else by the only process."""
    if os.environ.get("RANK", "0") == "0":
        print(f"nemotron-train {command}: error: {exc}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    from nemotron_train.errors import USER_ERROR_EXIT_CODE, UserError

    _quiet_known_warnings()

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR_EXIT_CODE
    try:
        rc = args.func(args)
    except UserError as exc:
        _report_user_error(args.command, exc)
        rc = USER_ERROR_EXIT_CODE
    if argv is None:
        sys.exit(rc or 0)
    return rc or 0
