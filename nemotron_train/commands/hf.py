"""`nemotron-train export-hf | import-hf`: Hugging Face interop.

    nemotron-train export-hf --checkpoint DIR [--iteration N] --output HFDIR [--dtype fp32|bf16] [--max-shard-size 5GB]
    nemotron-train import-hf --hf HFDIR --output DIR [--config RUN_CONFIG] [section.key=value ...]

A bad checkpoint or an unconvertible model raises a UserError (CheckpointError,
HFConversionError), which the command line reports as one line with exit status 2.
Heavy imports (megatron-core, safetensors) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from nemotron_train.checkpoint.layout import TRACKER
from nemotron_train.config.schema import ParamsDtype, choices

CHECKPOINT_HELP = f"checkpoints directory (with {TRACKER}), a run directory, or one iter_XXXXXXX directory"


def register(subparsers) -> None:
    p = subparsers.add_parser("export-hf", help="write a run checkpoint as a Hugging Face NemotronH model")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--output", required=True, help="new directory for config.json and the safetensors")
    p.add_argument("--dtype", choices=choices(ParamsDtype), default=None, help="weight dtype (default: the run's params dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("import-hf", help="turn a Hugging Face NemotronH model into a model-only run checkpoint")
    p.add_argument("--hf", required=True, help="directory with config.json and model*.safetensors")
    p.add_argument("--output", required=True, help="new checkpoints directory; the run config is written there as config.yaml")
    p.add_argument("--config", default=None, help="run config whose non-model sections the written config keeps")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for the written run config")
    p.set_defaults(func=_import)


def _export(args: argparse.Namespace) -> int:
    from nemotron_train.hf.convert import export_hf

    with contextlib.redirect_stdout(sys.stderr):
        export_hf(args.checkpoint, args.output, args.iteration, args.dtype, args.max_shard_size)
    return 0


def _import(args: argparse.Namespace) -> int:
    from nemotron_train.hf.convert import import_hf

    with contextlib.redirect_stdout(sys.stderr):
        import_hf(args.hf, args.output, args.config, args.overrides)
    return 0
