"""Look inside datasets.

    python -m data_tools.inspect out/web_text_document [--tokenizer SPEC] [--doc 0]
    python -m data_tools.inspect --blend configs/run.yaml [key=value ...] --samples 10000

The first form prints the document, sequence and token counts, the token id range, a
histogram of document lengths and one decoded document (the tokenizer defaults to the one
recorded at preprocessing). The second builds the config's training blend and prints,
for the first N samples, the share each dataset actually supplies next to its weight.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np

from nemotron_train.data.indexed import IndexedReader, check_indexed_dataset, read_trusted_stats
from nemotron_train.data.tokenizers import SPEC_HELP, load_tokenizer
from nemotron_train.errors import DataError, UserError


def length_histogram(lengths: np.ndarray, bins: int = 10, width: int = 40) -> List[str]:
    """Text histogram over power-of-two buckets (document lengths span decades)."""
    if lengths.size == 0:
        return ["(no documents)"]
    edges = [0] + [2**k for k in range(int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1))) + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    nonzero = np.nonzero(counts)[0]
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    peak = int(counts.max())
    rows = []
    for i in range(lo, hi):
        bar = "#" * max(1 if counts[i] else 0, round(width * counts[i] / peak))
        rows.append(f"  {edges[i]:>9,} - {edges[i + 1] - 1:>9,} | {counts[i]:>9,} {bar}")
    return rows[-bins * 3 :]


def describe(prefix: str, tokenizer_spec: Optional[str], doc: int, max_chars: int) -> None:
    stats = check_indexed_dataset(prefix, scan=True)
    reader = IndexedReader(prefix)
    lengths = reader.document_lengths()
    print(f"dataset   {reader.prefix}")
    print(f"dtype     {stats.dtype}")
    print(f"documents {stats.documents:,}   sequences {stats.sequences:,}   tokens {stats.tokens:,}")
    print(f"token ids {stats.min_token_id} .. {stats.max_token_id}")
    if lengths.size:
        q = np.percentile(lengths, [50, 90, 99])
        print(f"doc length min {lengths.min():,}  mean {lengths.mean():,.1f}  median {q[0]:,.0f}  "
              f"p90 {q[1]:,.0f}  p99 {q[2]:,.0f}  max {lengths.max():,}")
    print("length histogram (tokens per document):")
    print("\n".join(length_histogram(lengths)))
    recorded = ((read_trusted_stats(reader.prefix) or {}).get("extra") or {}).get("tokenizer")
    spec = tokenizer_spec or recorded
    if not 0 <= doc < reader.num_documents:
        raise DataError(f"--doc {doc}: the dataset has documents 0..{reader.num_documents - 1}")
    ids = reader.document(doc)
    if spec:
        text = load_tokenizer(spec).decode(ids.tolist())
        more = f" ... ({len(text) - max_chars:,} more characters)" if len(text) > max_chars else ""
        print(f"document {doc} ({ids.size} tokens, decoded with {spec}):\n{text[:max_chars]}{more}")
    else:
        print(f"document {doc} ({ids.size} tokens; pass --tokenizer to decode): {ids[:64].tolist()}")


def blend_shares(config: str, overrides: List[str], samples: int) -> None:
    from nemotron_train.config import load_config
    from nemotron_train.data.datasets import build_datasets, realised_shares, resolve_sources
    from nemotron_train.data.tokenizers import build_tokenizer

    cfg = load_config(config, overrides)
    tokenizer = build_tokenizer(cfg)
    sources = resolve_sources(cfg, tokenizer)
    train, _, _ = build_datasets(cfg, tokenizer)
    if samples > len(train):
        print(f"note: the training set has {len(train):,} samples; counting all of them")
        samples = len(train)
    members, counts = realised_shares(train, samples)
    blend = sources.blend or (sources.blend_per_split or [None])[0]
    prefixes, weights = blend if blend else (members, None)
    weights = weights or [1.0] * len(prefixes)
    total_w = sum(weights)
    wanted = {p: w / total_w for p, w in zip(prefixes, weights)}
    print(f"training blend over the first {samples:,} samples ({len(train):,} built):")
    print(f"  {'weight':>8} {'realised':>9} {'samples':>10}  dataset")
    for path, count in zip(members, counts):
        print(f"  {wanted.get(path, float('nan')):>8.4f} {count / max(samples, 1):>9.4f} {int(count):>10,}  {path}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", help="dataset prefix (<prefix>.bin/.idx)")
    p.add_argument("--tokenizer", default=None, help=f"decode with this tokenizer ({SPEC_HELP})")
    p.add_argument("--doc", type=int, default=0, help="document to decode (default 0)")
    p.add_argument("--max-chars", type=int, default=600, help="characters of the decoded document to print")
    p.add_argument("--blend", metavar="CONFIG", default=None, help="show the realised blend of a run config instead")
    p.add_argument("--samples", type=int, default=10000, help="samples to count with --blend")
    p.add_argument("overrides", nargs="*", default=[], help="with --blend: section.key=value overrides")


def run(args: argparse.Namespace) -> int:
    if args.blend:
        overrides = ([args.prefix] if args.prefix else []) + list(args.overrides)
        blend_shares(args.blend, overrides, args.samples)
    elif args.prefix:
        describe(args.prefix, args.tokenizer, args.doc, args.max_chars)
    else:
        raise DataError("give a dataset PREFIX, or --blend CONFIG")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:  # data and config-file errors alike
        print(f"inspect: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
