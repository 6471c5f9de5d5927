"""Tokenizers behind one interface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `eod`, plus `encode_batch` for the preprocessing hot loop.

Specs (the `--tokenizer` flag and `data.tokenizer.type`):

- `byte`: UTF-8 bytes 0..255 and `<|endoftext|>` = 256 (vocab 257); needs no file.
- `hf:FILE`: a Hugging Face `tokenizers` JSON file (or a directory holding tokenizer.json).
- `tiktoken:FILE`: either a tiktoken ranks file (one `base64-token rank` per line; special
  tokens are appended after the last rank, `<|endoftext|>` first) or Megatron's JSON vocab
  (a list of {rank, token_bytes, token_str}; 1000 special tokens first, `</s>` = 2 is the
  end of document, 131072 tokens in all: the layout of Nemotron-H's tokenizer).
- `sentencepiece:FILE`: a SentencePiece model; its `</s>` is the end of document.
- `bundled`: the small BPE shipped with the bundled corpus (`nemotron_train.data.bundled`).

`build_tokenizer(cfg)` is the run's tokenizer (`data.tokenizer`, checked against
`model.vocab_size`), and `MegatronTokenizerAdapter` the view of it megatron-core's
datasets take in their config.

Each tokenizer runs single-threaded: `--workers N` then means N cores, and N processes
never oversubscribe the machine with the libraries' own thread pools.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from abc import ABC, abstractmethod
from collections import OrderedDict
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nemotron_train.data.bundled import TOKENIZER_FILE as BUNDLED_TOKENIZER
from nemotron_train.errors import DataError

if TYPE_CHECKING:
    from nemotron_train.config.schema import Config

# Keep the Rust tokenizers single-threaded (see the module docstring).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPEC_HELP = "byte | hf:FILE | tiktoken:FILE | sentencepiece:FILE | bundled"

# Split patterns for tiktoken: Megatron's v1/v2 (v2 is Nemotron-H's), OpenAI's cl100k and gpt2.
TIKTOKEN_PATTERNS: Dict[str, str] = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "cl100k": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "gpt2": r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
# Patterns under which every space after a non-space starts a new pre-token (see PieceMemo).
SPACE_SAFE_PATTERNS = frozenset(TIKTOKEN_PATTERNS.values())
# Megatron's TikTokenizer layout: these names first, then <SPECIAL_i> fillers up to 1000.
MEGATRON_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
MEGATRON_NUM_SPECIAL_TOKENS = 1000
MEGATRON_TIKTOKEN_VOCAB = 131072
# Names tried, in order, for the end-of-document token of a Hugging Face tokenizer.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eod>", "<eos>", "<|eot_id|>", "[SEP]")


class Tokenizer(ABC):
    """The common interface. `spec` rebuilds an equal tokenizer in another process."""

    spec: str
    vocab_size: int
    eod: int

    @abstractmethod
    def encode(self, text: str) -> List[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def encode_to_array(self, texts: List[str], dtype: Any, eod: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Tokenize documents into one flat array plus per-document lengths; `eod` (if given)
        ends every non-empty document. Preprocessing's hot path."""
        return _flatten(self.encode_batch(texts), dtype, eod)

    def fingerprint(self) -> str:
        """Identifies the vocabulary: the spec kind plus a hash of the tokenizer file."""
        return f"{type(self).__name__}:{self.vocab_size}:{self.eod}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _append_eod(flat: np.ndarray, lengths: np.ndarray, eod: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    if eod is None or lengths.size == 0:
        return flat, lengths
    ends = np.cumsum(lengths)[lengths > 0]
    return np.insert(flat, ends, eod), lengths + (lengths > 0)


def _flatten(ids_list: List[List[int]], dtype: Any, eod: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids_list), dtype=np.int64, count=len(ids_list))
    flat = np.fromiter(chain.from_iterable(ids_list), dtype=dtype, count=int(lengths.sum()))
    return _append_eod(flat, lengths, eod)


# A space preceded by a non-space. For the split patterns in SPACE_SAFE_PATTERNS a
# pre-token holding a non-space character has at most one space, as its first character,
# so every such position starts a new pre-token: cutting the text there and tokenizing the
# pieces separately gives exactly the ids of the whole text. Python's \s is a superset of
# the Unicode White_Space the Rust regex engines use, so it only ever cuts less.
_PIECE_BOUNDARY = re.compile(r"(?<=\S)(?= )")
# Where a plain split on " " would cut at a space that is not a boundary (see above).
_NOT_EVERY_SPACE = re.compile(r"[^\S ] |  ")


def split_pieces(text: str) -> List[Any]:
    """Pieces of `text` cut at every boundary space; the first piece is a 1-tuple, every
    later piece is given without its leading (boundary) space. Tuple and string keys never
    collide in the memo, so the same word at the start of a text and after a space (which
    tokenize differently) stay apart."""
    if _NOT_EVERY_SPACE.search(text) is None:
        parts: List[Any] = text.split(" ")  # every space is a boundary: the fast path
    else:
        cut = _PIECE_BOUNDARY.split(text)
        parts = [cut[0]] + [p[1:] for p in cut[1:]]
    parts[0] = (parts[0],)
    return parts


def _piece_text(key: Any) -> str:
    return key[0] if type(key) is tuple else " " + key


class PieceMemo:
    """Tokenize text as word-sized pieces, each distinct piece once: natural text repeats a
    small set of words, so most pieces hit the memo and skip the tokenizer entirely. Token
    ids live in one flat table; a batch is assembled with numpy gathers, not Python lists."""

    def __init__(self, encode_pieces: Callable[[List[str]], List[List[int]]], max_entries: int = 1 << 20) -> None:
        self.encode_pieces = encode_pieces
        self.max_entries = max_entries
        self._clear()

    def _clear(self) -> None:
        self.index: Dict[Any, int] = {}
        self._flat = np.zeros(1 << 16, dtype=np.int64)
        self._offsets = np.zeros(1 << 12, dtype=np.int64)
        self._lengths = np.zeros(1 << 12, dtype=np.int64)
        self._used = 0  # tokens in _flat

    def _add(self, keys: List[Any]) -> None:
        encoded = self.encode_pieces([_piece_text(k) for k in keys])
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        first, n = len(self.index), len(keys)
        while first + n > self._offsets.size:  # grow by doubling: amortized O(1) per entry
            self._offsets = np.resize(self._offsets, 2 * self._offsets.size)
            self._lengths = np.resize(self._lengths, 2 * self._lengths.size)
        while self._used + flat.size > self._flat.size:
            self._flat = np.resize(self._flat, 2 * self._flat.size)
        self._flat[self._used : self._used + flat.size] = flat
        self._lengths[first : first + n] = lengths
        self._offsets[first : first + n] = self._used + np.cumsum(lengths) - lengths
        self._used += flat.size
        self.index.update(zip(keys, range(first, first + n)))

    def encode_to_array(self, texts: List[str], dtype: Any, eod: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
        per_doc = list(map(split_pieces, texts))
        keys = list(chain.from_iterable(per_doc))
        ids = np.fromiter(map(self.index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        if ids.size and ids.min() < 0:
            index = self.index
            new = [k for k in dict.fromkeys(keys) if k not in index]  # dedupe in C, filter the few
            if len(index) + len(new) > self.max_entries:
                self._clear()
                return self.encode_to_array(texts, dtype, eod)
            self._add(new)
            ids = np.fromiter(map(self.index.__getitem__, keys), dtype=np.int64, count=len(keys))
        lens, starts = self._lengths[ids], self._offsets[ids]
        ends = np.cumsum(lens)
        # Output position p of piece k reads table slot starts[k] + (p - (ends[k] - lens[k])).
        gather = np.repeat(starts - (ends - lens), lens) + np.arange(int(ends[-1]) if ends.size else 0)
        flat = self._flat[gather].astype(dtype)
        counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(per_doc))
        doc_starts = np.cumsum(counts) - counts
        lengths = np.add.reduceat(lens, doc_starts) if len(texts) else counts
        return _append_eod(flat, lengths, eod)


class _MemoizedTokenizer(Tokenizer):
    """Uses a PieceMemo when the tokenizer's structure allows it, after checking on the
    first batch that it reproduces direct tokenization exactly (else falls back for good)."""

    _memo: Optional[PieceMemo] = None
    _memo_checked = False

    def encode_to_array(self, texts: List[str], dtype: Any, eod: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        if self._memo is None:
            return _flatten(self.encode_batch(texts), dtype, eod)
        if not self._memo_checked:
            self._memo_checked = True
            sample = texts[:64]
            got = self._memo.encode_to_array(sample, dtype, eod)
            want = _flatten(self.encode_batch(sample), dtype, eod)
            if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
                print(f"note: {self.spec}: piece memo disagrees with direct tokenization; not using it", file=sys.stderr)
                self._memo = None
                return self.encode_to_array(texts, dtype, eod)
        return self._memo.encode_to_array(texts, dtype, eod)


class _FileTokenizer(_MemoizedTokenizer):
    path: Path

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}:{_file_digest(self.path)}"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes; the only special token is the end of document."""

    def __init__(self) -> None:
        self.spec = "byte"
        self.eod = 256
        self.vocab_size = 257

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_to_array(self, texts: List[str], dtype: Any, eod: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        # Lone surrogates (possible in JSON escapes) have no UTF-8 form: they become "?".
        raw = [t.encode("utf-8", errors="replace") for t in texts]
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        flat = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(dtype)
        return _append_eod(flat, lengths, eod)

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        parts: List[str] = []
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            else:
                parts.append(out.decode("utf-8", errors="replace"))
                out = bytearray()
                parts.append("<|endoftext|>" if i == self.eod else f"<|byte_special_{i}|>")
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer(_FileTokenizer):
    """A Hugging Face `tokenizers` JSON file, used without its post-processor (no BOS/EOS
    insertion): the end of document is added by preprocessing where asked for."""

    def __init__(self, path: Path, spec: str, eod_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error has no file name
            raise DataError(f"{path}: not a Hugging Face tokenizers JSON file ({exc})") from None
        self.path, self.spec = path, spec
        # A tokenizer.json may carry truncation or padding settings: never cut a document.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                self.eod = tid
                break
        else:
            raise DataError(
                f"{path}: no end-of-document token found (looked for {', '.join(names)}); "
                "add one of them to the tokenizer's special tokens"
            )
        self._fast = hasattr(self._tok, "encode_batch_fast")
        if _hf_memo_safe(json.loads(self._tok.to_str())):
            self._memo = PieceMemo(self.encode_batch)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        # One call into Rust for the whole batch; the `fast` variant skips offset tracking.
        encode = self._tok.encode_batch_fast if self._fast else self._tok.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _hf_memo_safe(spec: Dict[str, Any]) -> bool:
    """True for byte-level BPE without a normalizer whose split pattern is space-safe (GPT-2
    style ByteLevel, or a known Split pattern + ByteLevel) and no added token with a space."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return False
    if any(" " in t.get("content", "") for t in spec.get("added_tokens") or []):
        return False
    if pre.get("type") == "ByteLevel":
        return bool(pre.get("use_regex", True))
    if pre.get("type") != "Sequence":
        return False
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2 or parts[0].get("type") != "Split" or parts[1].get("type") != "ByteLevel":
        return False
    split, level = parts
    pattern = (split.get("pattern") or {}).get("Regex")
    return (
        pattern in SPACE_SAFE_PATTERNS and split.get("behavior") == "Isolated"
        and not split.get("invert") and not level.get("use_regex", True)
    )


def _read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise DataError(
                    f"{path}:{lineno}: not a tiktoken ranks line (expected `base64-token rank`)"
                ) from None
    if not ranks:
        raise DataError(f"{path}: empty tiktoken ranks file")
    return ranks


def _read_megatron_vocab(path: Path, inner_vocab: int) -> Dict[bytes, int]:
    try:
        vocab = json.loads(path.read_text())
        items = vocab[:inner_vocab]
        return {base64.b64decode(x["token_bytes"]): int(x["rank"]) + MEGATRON_NUM_SPECIAL_TOKENS for x in items}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: not a Megatron tiktoken vocab (a JSON list of {{rank, token_bytes, token_str}}): {exc}"
        ) from None


class TiktokenTokenizer(_FileTokenizer):
    """tiktoken BPE. A `.json` file is Megatron's vocab with its 1000 special tokens first
    (ids compatible with data tokenized by Megatron-LM's TikTokenizer); any other file is a
    ranks file with `special_tokens` appended after the highest rank."""

    def __init__(self, path: Path, spec: str, pattern: Optional[str] = None, special_tokens: Optional[List[str]] = None) -> None:
        import tiktoken

        self.path, self.spec = path, spec
        pattern = pattern or "v2"
        pat_str = TIKTOKEN_PATTERNS.get(pattern, pattern)
        self.megatron_layout = path.suffix == ".json"
        if self.megatron_layout:
            names = list(special_tokens or MEGATRON_SPECIAL_TOKENS)
            names += [f"<SPECIAL_{i}>" for i in range(len(names), MEGATRON_NUM_SPECIAL_TOKENS)]
            ranks = _read_megatron_vocab(path, MEGATRON_TIKTOKEN_VOCAB - MEGATRON_NUM_SPECIAL_TOKENS)
            specials = {name: i for i, name in enumerate(names)}
            eod_name = "</s>"
        else:
            names = list(special_tokens or ["<|endoftext|>"])
            ranks = _read_tiktoken_ranks(path)
            first = max(ranks.values()) + 1
            specials = {name: first + i for i, name in enumerate(names)}
            eod_name = names[0]
        try:
            self._enc = tiktoken.Encoding(name=path.stem, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        except ValueError as exc:
            raise DataError(f"{path}: cannot build a tiktoken encoding ({exc}); check the file and the pattern") from None
        self.vocab_size = max(max(ranks.values()), max(specials.values())) + 1
        self.eod = specials[eod_name]
        # Megatron's TikTokenizer turns special-token text in documents into the special ids.
        self._allowed = "all" if self.megatron_layout else set()
        if pat_str in SPACE_SAFE_PATTERNS and not any(" " in name for name in specials):
            self._memo = PieceMemo(self.encode_batch)

    def encode(self, text: str) -> List[int]:
        if self._allowed:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        if self._allowed:
            return [self._enc.encode(t, allowed_special="all") for t in texts]
        return list(map(self._enc.encode_ordinary, texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model (no piece memo: it rewrites whitespace and normalizes text)."""

    def __init__(self, path: Path, spec: str) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path}: not a SentencePiece model ({exc})") from None
        self.path, self.spec = path, spec
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod = int(self._sp.eos_id())
        if self.eod < 0:
            raise DataError(f"{path}: the SentencePiece model has no end-of-sentence piece (train it with eos_id >= 0)")

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _existing(path_text: str, spec: str) -> Path:
    if not path_text:
        raise DataError(f"tokenizer {spec!r} needs a file: use {spec.split(':')[0]}:FILE")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer file not found: {path} (from tokenizer spec {spec!r})")
    return path


def load_tokenizer(
    spec: str,
    path: Optional[str] = None,
    tiktoken_pattern: Optional[str] = None,
    special_tokens: Optional[List[str]] = None,
    piece_memo: bool = True,
) -> Tokenizer:
    """Build a tokenizer from a spec (see the module docstring). `path` is an alternative to
    writing the file into the spec (`type: hf` with `path: FILE`). `piece_memo=False`
    turns the PieceMemo off (it never changes the ids; this is for measuring it)."""
    tok = _load(spec, path, tiktoken_pattern, special_tokens)
    if not piece_memo and isinstance(tok, _MemoizedTokenizer):
        tok._memo = None
    return tok


def _load(spec: str, path: Optional[str], tiktoken_pattern: Optional[str], special_tokens: Optional[List[str]]) -> Tokenizer:
    kind, sep, file_part = spec.partition(":")
    kind = kind.strip().lower()
    file_part = file_part or (path or "")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bundled":
        if not BUNDLED_TOKENIZER.is_file():
            raise DataError(f"the bundled tokenizer is missing: {BUNDLED_TOKENIZER} (reinstall the package)")
        return HFTokenizer(BUNDLED_TOKENIZER, "bundled")
    if kind in ("hf", "huggingface"):
        p = _existing(file_part, spec)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {p} (from tokenizer spec {spec!r})")
        return HFTokenizer(p.resolve(), f"hf:{p.resolve()}")
    if kind == "tiktoken":
        p = _existing(file_part, spec).resolve()
        return TiktokenTokenizer(p, f"tiktoken:{p}", tiktoken_pattern, special_tokens)
    if kind in ("sentencepiece", "spm"):
        p = _existing(file_part, spec).resolve()
        return SentencePieceTokenizer(p, f"sentencepiece:{p}")
    raise DataError(f"unknown tokenizer {spec!r}; expected {SPEC_HELP}")


def token_dtype_for(vocab_size: int):
    """Megatron's choice: uint16 below 65500 tokens, else int32."""
    import numpy as np

    return np.uint16 if vocab_size < 65500 else np.int32


# --------------------------------------------------------------------------- the run's tokenizer


def build_tokenizer(cfg: Config) -> Tokenizer:
    """`data.tokenizer` as a tokenizer with `vocab_size`, `eod`, `encode`, `decode`.

    Its vocabulary must fit the model's embedding (`model.vocab_size`, which may be padded
    above the tokenizer's size but never below it)."""
    t = cfg.data.tokenizer
    tok = load_tokenizer(t.type, t.path, tiktoken_pattern=getattr(t, "tiktoken_pattern", None))
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer.type={t.type!r} has {tok.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size to at least {tok.vocab_size}"
        )
    return tok


class MegatronTokenizerAdapter:
    """What megatron-core's GPT datasets read from `config.tokenizer`: `vocab_size`, `eod`,
    and `unique_identifiers`, which enter the hash naming the cached sample indices (the
    tokenizer file's digest is part of it, so a changed vocabulary gets fresh indices).

    No `pad` attribute on purpose: mcore then pads short samples with a sentinel id it
    masks out, instead of masking a real token id found in the data."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.unique_identifiers = OrderedDict(
            [("class", type(tokenizer).__name__), ("fingerprint", tokenizer.fingerprint())]
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    @property
    def eod(self) -> int:
        return self._tok.eod

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text), dtype=np.int64)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)
