"""`nemotron-train` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)` adding its parser with `set_defaults(func=handler)`; handler(args) -> int."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import warnings
from typing import List, Optional

# Modules that register subcommands, in help order. A module that fails to import is a bug.
COMMAND_MODULES = [
    "nemotron_train.commands.train",  # train
    "nemotron_train.commands.plan",  # plan
    "data_tools.cli",  # preprocess, inspect, prepare-cache
    "nemotron_train.commands.hf",  # export-hf, import-hf
    "nemotron_train.commands.score",  # score
    "nemotron_train.commands.ablate",  # ablate, compare
    "launch.sbatch",  # sbatch
    "launch.local_cluster",  # local-cluster
]


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser whose options may come before, between or after the `key=value`
    overrides (`CONFIG --nodes 2 train.steps=10`): plain argparse stops matching a `*`
    positional once it has matched empty before the options. Set a subparser's
    `__class__` to it."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


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


# How long a rank other than 0 waits before reporting a user error itself (see below).
NONZERO_RANK_REPORT_DELAY_S = 5.0


def _report_user_error(command: str, exc: Exception) -> None:
    """One message, printed once.

    Every rank loads the same config, so an error is usually raised on all ranks: rank 0
    prints it and exits, and the launcher (torchrun, srun) stops the others while they wait
    here. An error only some ranks hit (a file missing on one node) leaves rank 0 running, so
    a waiting rank prints it itself, with its rank, after the delay."""
    rank = int(os.environ.get("RANK", "0") or 0)
    prefix = ""
    if rank != 0:
        # The trainer's stop handler turns SIGTERM into a flag; here it must end the process.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(NONZERO_RANK_REPORT_DELAY_S)
        prefix = f"[rank {rank}] "
    print(f"{prefix}nemotron-train {command}: error: {exc}", file=sys.stderr, flush=True)


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
