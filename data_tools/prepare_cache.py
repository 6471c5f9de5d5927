"""Build a run's dataset indices ahead of the job.

    nemotron-train prepare-cache CONFIG [key=value ...] [--check]
    python -m data_tools.prepare_cache CONFIG [key=value ...] [--check]

Validates the tokenizer and every dataset of the config, tokenizes the bundled corpus if
the config uses it, rebuilds cached indices whose dataset files changed, and builds the
train/valid/test sample indices into the cache directory (`data.cache_dir`, default
`<run.output_dir>/data_cache`), so the training job starts without building them.
`--check` only reports whether the cache is stale (exit status 2 if so) and builds nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nemotron_train.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--check", action="store_true", help="only check for stale cached indices; build nothing")


def run(args: argparse.Namespace) -> int:
    from nemotron_train.config import load_config
    from nemotron_train.data.datasets import build_datasets, prepare_data, resolve_sources, split_sizes
    from nemotron_train.data.tokenizers import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = build_tokenizer(cfg)
    sources = resolve_sources(cfg, tokenizer)
    if cfg.data.source == "mock":
        print("data.source is mock: nothing to cache")
        return 0
    if args.check:
        prepare_data(cfg, tokenizer, sources, rebuild=False)
        print(f"{sources.cache_dir}: up to date for {len(sources.prefixes)} dataset(s)")
        return 0
    datasets = build_datasets(cfg, tokenizer)
    print(f"cache {sources.cache_dir}")
    for name, wanted, ds in zip(("train", "valid", "test"), split_sizes(cfg), datasets):
        built = f"{len(ds):,} samples built" if ds is not None else "none"
        print(f"  {name:<5} {wanted:>12,} samples wanted, {built}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.prepare_cache", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"prepare-cache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
