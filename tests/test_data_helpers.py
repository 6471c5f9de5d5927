"""Shared fixtures for the data tests: texts, tokenizer files built on the fly, datasets."""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from data_tools.preprocess import preprocess
from data_tools.train_bpe import train_bpe

WORDS = ("the quick brown fox jumps over a lazy dog while seven happy children sing songs about "
         "rivers mountains and the old bakery near our school café naïve façade 2024 42").split()


def sample_texts(n: int, seed: int = 0) -> List[str]:
    """Varied documents: unicode, digits, punctuation, newlines, double spaces, tabs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
        text = " ".join(words).capitalize() + rng.choice([".", "!", "?"])
        if i % 5 == 1:
            text += "\n\nSecond  paragraph,\twith “quotes” — and émoji 😀."
        if i % 7 == 3:
            text = "  " + text + " \n "
        out.append(text)
    return out


def write_jsonl(path: Path, records: Iterable[Dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, records: List[Dict], row_group_size: int = 16) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=row_group_size)
    return path


def make_hf_tokenizer(tmp: Path, vocab_size: int = 400) -> Path:
    return train_bpe(sample_texts(300, seed=1), tmp / "hf" / "tokenizer.json", vocab_size=vocab_size)


def make_tiktoken_ranks(tmp: Path) -> Path:
    """A tiny ranks file: the 256 bytes plus a few English merges."""
    merges = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"er", b" a", b"ou", b"an", b"and", b" and"]
    tokens = [bytes([b]) for b in range(256)] + merges
    path = tmp / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def make_sentencepiece(tmp: Path) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts(300, seed=2)), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, hard_vocab_limit=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    path = tmp / "sp.model"
    path.write_bytes(model.getvalue())
    return path


def make_dataset(tmp: Path, name: str, texts: List[str], tokenizer: str = "byte", append_eod: bool = True) -> str:
    src = write_jsonl(tmp / f"{name}.jsonl", ({"text": t} for t in texts))
    preprocess([str(src)], str(tmp / name), tokenizer, append_eod=append_eod, progress=False)
    return str(tmp / f"{name}_text_document")


def data_config(tmp: Path, overrides: Optional[List[str]] = None):
    """A small run config writing under `tmp`: byte tokenizer, seq 32, 10 steps of 8."""
    from nemotron_train.config import load_config

    base = [
        f"run.output_dir={tmp / 'run'}", "model.vocab_size=512", "data.tokenizer.type=byte",
        "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=10",
        "train.eval_interval=5", "train.eval_iters=2", "train.seed=7",
    ]
    return load_config(None, base + list(overrides or []))


def blend_override(entries: List[tuple], key: str = "blend") -> str:
    items = ", ".join(f"{{path: '{p}', weight: {w}}}" for p, w in entries)
    return f"data.{key}=[{items}]"
