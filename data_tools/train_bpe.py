"""Train a small byte-level BPE with the `tokenizers` library on local text.

    python -m data_tools.train_bpe --input corpus.txt.gz --vocab-size 512 --output tokenizer.json

Inputs: `.txt` / `.txt.gz` (documents separated by blank lines) or `.jsonl` / `.jsonl.gz`
(the `--json-key` field). The result is GPT-2 style: `<|endoftext|>` is id 0 and the end
of document, the 256 byte symbols follow, then the merges; decoding restores the text
exactly. It loads with `--tokenizer hf:FILE`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

from nemotron_train.errors import DataError, UserError

EOD_TOKEN = "<|endoftext|>"


def _read_texts(path: str, json_key: str) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    stem = path[:-3] if path.endswith(".gz") else path
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith((".jsonl", ".json")):
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)[json_key]
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{path}:{lineno}: not a JSON object with a {json_key!r} string") from None
        else:
            for doc in f.read().split("\n\n"):
                if doc.strip():
                    yield doc.strip()


def train_bpe(
    texts: Iterable[str],
    output: str | Path,
    vocab_size: int = 512,
    special_tokens: Sequence[str] = (EOD_TOKEN,),
    min_frequency: int = 2,
) -> Path:
    """Train and save a byte-level BPE; returns the output path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise DataError(f"--vocab-size {vocab_size}: must be at least {len(alphabet) + len(special_tokens)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=alphabet, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    return output


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.train_bpe", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help=".txt(.gz) or .jsonl(.gz) files")
    p.add_argument("--output", required=True, help="tokenizer JSON to write")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--json-key", default="text")
    args = p.parse_args(argv)
    try:
        texts = (t for path in args.input for t in _read_texts(path, args.json_key))
        out = train_bpe(texts, args.output, args.vocab_size)
    except UserError as exc:
        print(f"train_bpe: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
