"""`nemotron-train preprocess | inspect | prepare-cache`: the data subcommands."""

from __future__ import annotations

from data_tools import inspect as inspect_cmd
from data_tools import prepare_cache, preprocess


def register(subparsers) -> None:
    p = subparsers.add_parser("preprocess", help="tokenize JSONL / JSONL.gz / Parquet into Megatron .bin/.idx")
    preprocess.add_arguments(p)
    p.set_defaults(func=preprocess.run)

    p = subparsers.add_parser("inspect", help="counts, length histogram and a decoded sample of a dataset; or a blend's shares")
    inspect_cmd.add_arguments(p)
    p.set_defaults(func=inspect_cmd.run)

    p = subparsers.add_parser("prepare-cache", help="build a config's dataset indices ahead of the job")
    prepare_cache.add_arguments(p)
    p.set_defaults(func=prepare_cache.run)
