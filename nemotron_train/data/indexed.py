"""Megatron indexed datasets (`.bin` tokens + `.idx` index): a fast writer, a strict reader
and `check_indexed_dataset`, which catches what megatron-core does not (a truncated or
mismatched `.bin`, token ids outside the vocabulary) with an error naming the file.

`.idx` layout (little-endian): `MMIDIDX\\x00\\x00`, version 1 (uint64), dtype code (uint8),
sequence count N (uint64), document count D (uint64), N int32 lengths, N int64 byte
pointers into the `.bin`, D int64 document boundaries (sequence indices, 0 first, N last).

The writer also leaves `<prefix>.stats.json` (counts, max token id) so later checks need not
scan a large `.bin` to find its max token id. The sidecar is trusted only for the very files
it was written with: same inode, size and change time (ctime). The kernel sets ctime on every
write, rename or `touch`, and no tool can set it back (`cp -p` and `rsync -a` restore mtime
only), so an edit anywhere in the `.bin` makes the next check scan it; a scan's result is
remembered under the same identity.

The writer commits a pair with the `.idx` last: both files are fsync'd under temporary
names, the old `.idx` is removed, then the `.bin` and the `.idx` are renamed into place. A
crash at any point leaves the old pair, or a `.bin` without `.idx` (reported as missing), or
the new pair; never a `.bin` and an `.idx` that describe different data.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from nemotron_train.errors import DataError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
_PREAMBLE = len(HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, N, D
# Megatron's DType enum codes.
DTYPE_CODES: Dict[int, Any] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
STATS_FORMAT = 2  # 2: files identified by inode, size, mtime and ctime (1 trusted size + end digests)
_SCAN_CHUNK = 1 << 24  # elements per step when scanning a .bin for its max token id


@dataclass
class IndexStats:
    prefix: str
    dtype: str
    sequences: int
    documents: int
    tokens: int
    max_token_id: Optional[int] = None
    min_token_id: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def normalize_prefix(path: str) -> str:
    """Accept `data_text_document`, `data_text_document.bin` or `.idx` alike."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def file_identity(path: str) -> Dict[str, int]:
    """What changes whenever a file's content may have: a rewrite in place moves size/mtime
    and ctime, a replacement (`cp -p`, `rsync -a`, `mv`) the inode and ctime. ctime cannot be
    set from user space, so equal identities mean the file was not written since."""
    st = os.stat(path)
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


# File times advance in clock ticks (up to 10 ms): a write in the same tick as the last one
# may leave ctime unchanged. An identity is recorded only once the clock is past that tick,
# so any later write gets a new ctime.
_TIME_TICK_NS = 20_000_000


def settled_identity(path: str, wait: bool) -> Optional[Dict[str, int]]:
    """file_identity(path), once a later write is sure to change it: after sleeping out the
    clock tick of its last change (`wait`), or None if that tick has not passed yet."""
    ident = file_identity(path)
    delay = ident["ctime_ns"] + _TIME_TICK_NS - time.time_ns()
    if delay > 0:
        if not wait:
            return None
        time.sleep(delay / 1e9)
    return ident


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writer


class IndexedWriter:
    """Streams token chunks to `<prefix>.bin` and writes `<prefix>.idx` at the end, one
    sequence per document. Files appear under their final names only when complete."""

    def __init__(self, prefix: str, dtype: Any) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        # Per-process temporary names: two jobs writing one prefix never mix their bytes.
        self._tmp = f".{os.getpid()}.tmp"
        self._bin_tmp = prefix + ".bin" + self._tmp
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: List[np.ndarray] = []
        self.tokens = 0
        self.max_token_id = -1
        self.min_token_id: Optional[int] = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray, max_id: Optional[int] = None) -> None:
        """Append documents: `tokens` concatenated, `lengths` per document (all > 0)."""
        if len(lengths) == 0:
            return
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(memoryview(tokens).cast("B"))
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.tokens += int(tokens.size)
        if tokens.size:
            hi = int(tokens.max()) if max_id is None else max_id
            lo = int(tokens.min())
            self.max_token_id = max(self.max_token_id, hi)
            self.min_token_id = lo if self.min_token_id is None else min(self.min_token_id, lo)

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self.prefix + ".idx" + self._tmp):
            if os.path.exists(p):
                os.remove(p)

    def _commit(self, idx_tmp: str) -> None:
        """Rename the fsync'd pair into place, `.idx` last (see the module docstring)."""
        _fsync_path(self._bin_tmp)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        for stale in (self.prefix + ".idx", stats_path(self.prefix)):
            if os.path.exists(stale):
                os.remove(stale)
        _fsync_path(directory)
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")
        _fsync_path(directory)

    def finalize(self, extra: Optional[Dict[str, Any]] = None) -> IndexStats:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        n = int(lengths.size)
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        idx_tmp = self.prefix + ".idx" + self._tmp
        with open(idx_tmp, "wb") as f:
            f.write(HEADER)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._commit(idx_tmp)
        stats = IndexStats(
            prefix=self.prefix, dtype=self.dtype.name, sequences=n, documents=n, tokens=self.tokens,
            max_token_id=self.max_token_id if n else None, min_token_id=self.min_token_id, extra=dict(extra or {}),
        )
        write_stats_sidecar(stats)
        return stats


def stats_path(prefix: str) -> str:
    return prefix + ".stats.json"


def write_stats_sidecar(stats: IndexStats) -> None:
    bin_path, idx_path = stats.prefix + ".bin", stats.prefix + ".idx"
    record = asdict(stats)
    record.update(format=STATS_FORMAT, bin_file=settled_identity(bin_path, wait=True),
                  idx_file=settled_identity(idx_path, wait=True))
    tmp = f"{stats_path(stats.prefix)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, stats_path(stats.prefix))


def read_trusted_stats(prefix: str) -> Optional[Dict[str, Any]]:
    """The sidecar, if it still describes these exact files (same identity: see file_identity)."""
    try:
        with open(stats_path(prefix)) as f:
            record = json.load(f)
        if record.get("format") != STATS_FORMAT:
            return None
        if record["bin_file"] != file_identity(prefix + ".bin") or record["idx_file"] != file_identity(prefix + ".idx"):
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- reader


@dataclass
class IndexArrays:
    dtype: Any
    lengths: np.ndarray  # int32 per sequence
    pointers: np.ndarray  # int64 byte offsets per sequence
    doc_indices: np.ndarray  # int64 sequence boundaries per document, D entries


def _read_preamble(idx_path: str) -> Tuple[Any, int, int]:
    size = os.path.getsize(idx_path)
    if size < _PREAMBLE:
        raise DataError(f"{idx_path}: only {size} bytes, too short for a Megatron index (truncated?); re-run preprocessing")
    with open(idx_path, "rb") as f:
        head = f.read(_PREAMBLE)
    if head[: len(HEADER)] != HEADER:
        raise DataError(f"{idx_path}: bad header {head[:len(HEADER)]!r}, not a Megatron .idx file (expected {HEADER!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise DataError(f"{idx_path}: index version {version} is not supported (only version {VERSION}); re-run preprocessing")
    code = head[17]
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown token dtype code {code} (valid: {sorted(DTYPE_CODES)})")
    n, d = struct.unpack("<QQ", head[18:34])
    expected = _PREAMBLE + n * 4 + n * 8 + d * 8
    if size not in (expected, expected + n):  # + n: the multimodal variant's per-sequence modes
        raise DataError(
            f"{idx_path}: {size} bytes, but its header ({n} sequences, {d} document boundaries) needs {expected}; "
            "the index is truncated or corrupt, re-run preprocessing"
        )
    return DTYPE_CODES[code], n, d


def read_index(prefix: str) -> IndexArrays:
    """Memory-map and validate an `.idx` file (header, sizes, document boundaries)."""
    prefix = normalize_prefix(prefix)
    idx_path = prefix + ".idx"
    if not os.path.isfile(idx_path):
        raise DataError(f"{idx_path}: index file not found (a dataset is a <prefix>.bin + <prefix>.idx pair)")
    dtype, n, d = _read_preamble(idx_path)
    buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(buf, dtype=np.int32, count=n, offset=_PREAMBLE)
    pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=_PREAMBLE + 4 * n)
    docs = np.frombuffer(buf, dtype=np.int64, count=d, offset=_PREAMBLE + 12 * n)
    if d == 0 or docs[0] != 0 or docs[-1] != n or (d > 1 and bool(np.any(np.diff(docs) < 0))):
        raise DataError(f"{idx_path}: document boundaries must rise from 0 to the sequence count {n}; the index is corrupt")
    return IndexArrays(dtype=dtype, lengths=lengths, pointers=pointers, doc_indices=docs)


def _check_pointers(idx_path: str, arr: IndexArrays) -> int:
    """Pointers must be the running sum of lengths; returns the byte size the .bin needs."""
    itemsize = np.dtype(arr.dtype).itemsize
    n = arr.lengths.size
    if n == 0:
        return 0
    if bool(np.any(arr.lengths < 0)) or arr.pointers[0] != 0:
        raise DataError(f"{idx_path}: negative sequence length or first pointer not 0; the index is corrupt")
    for start in range(0, n - 1, _SCAN_CHUNK):
        stop = min(n - 1, start + _SCAN_CHUNK)
        step = arr.pointers[start + 1 : stop + 1] - arr.pointers[start:stop]
        if not np.array_equal(step, arr.lengths[start:stop].astype(np.int64) * itemsize):
            raise DataError(f"{idx_path}: sequence pointers disagree with sequence lengths; the index is corrupt")
    return int(arr.pointers[-1]) + int(arr.lengths[-1]) * itemsize


def scan_token_range(prefix: str, dtype: Any) -> Tuple[int, int]:
    """(min, max) token id of a `.bin`, memory-mapped and scanned in chunks."""
    data = np.memmap(prefix + ".bin", mode="r", dtype=dtype)
    lo, hi = None, None
    for start in range(0, data.size, _SCAN_CHUNK):
        part = data[start : start + _SCAN_CHUNK]
        lo = int(part.min()) if lo is None else min(lo, int(part.min()))
        hi = int(part.max()) if hi is None else max(hi, int(part.max()))
    return (lo if lo is not None else 0), (hi if hi is not None else -1)


def _remembered_range(path: Optional[str], prefix: str) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """A token range found by an earlier scan of this exact `.bin` (same file_identity)."""
    if not path:
        return None, {}
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    hit = table.get(prefix)
    if isinstance(hit, dict) and hit.get("bin_file") == file_identity(prefix + ".bin"):
        return hit, table
    return None, table


def _remember_range(
    path: Optional[str], table: Dict[str, Any], prefix: str, lo: int, hi: int, scanned: Dict[str, int]
) -> None:
    if not path:
        return
    ident = settled_identity(prefix + ".bin", wait=False)
    if ident is None or ident != scanned:
        return  # written during or just after the scan: scan again next time
    table[prefix] = {"bin_file": ident, "min_token_id": lo, "max_token_id": hi}
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass  # only a speed-up for the next check


def _token_range(prefix: str, dtype: Any, scan: bool, range_cache: Optional[str]) -> Tuple[Optional[int], int, Dict[str, Any]]:
    """(min, max, sidecar extra): from the preprocessing sidecar, a remembered scan, or a scan."""
    record = None if scan else read_trusted_stats(prefix)
    if record is not None and record.get("max_token_id") is not None:
        return record.get("min_token_id"), record["max_token_id"], dict(record.get("extra") or {})
    hit, table = (None, {}) if scan else _remembered_range(range_cache, prefix)
    if hit is not None:
        return hit["min_token_id"], hit["max_token_id"], {}
    scanned = file_identity(prefix + ".bin")
    lo, hi = scan_token_range(prefix, dtype)
    _remember_range(range_cache, table, prefix, lo, hi, scanned)
    return lo, hi, {}


def check_indexed_dataset(
    prefix: str, vocab_size: Optional[int] = None, scan: bool = False, range_cache: Optional[str] = None
) -> IndexStats:
    """Validate a `.bin`/`.idx` pair; raise `DataError` naming the file on any problem.

    Checks: both files exist; header, version and dtype code; the index size matches its
    counts; document boundaries; pointers match lengths; the `.bin` size matches the index;
    at least one token; with `vocab_size`, every token id in [0, vocab_size). The max token
    id comes from the preprocessing sidecar when it still matches the files, else from an
    earlier scan remembered in the JSON file `range_cache` (if given), else from a scan of
    the `.bin` (always, when `scan` is true).
    """
    prefix = normalize_prefix(str(prefix))
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{' and '.join(missing)}: not found; a dataset path is the prefix of a .bin/.idx pair "
            "written by `nemotron-train preprocess` (e.g. out/mydata_text_document)"
        )
    arr = read_index(prefix)
    needed = _check_pointers(idx_path, arr)
    bin_size = os.path.getsize(bin_path)
    if bin_size != needed:
        raise DataError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} describes {needed} bytes of tokens; "
            "the .bin is truncated or belongs to another preprocessing run, re-run preprocessing"
        )
    tokens = int(needed // np.dtype(arr.dtype).itemsize)
    if tokens == 0:
        raise DataError(f"{bin_path}: the dataset holds no tokens ({arr.lengths.size} sequences); check the preprocessing input")
    stats = IndexStats(
        prefix=prefix, dtype=np.dtype(arr.dtype).name, sequences=int(arr.lengths.size),
        documents=int(arr.doc_indices.size - 1), tokens=tokens,
    )
    if vocab_size is not None or scan:
        stats.min_token_id, stats.max_token_id, stats.extra = _token_range(prefix, arr.dtype, scan, range_cache)
    if vocab_size is not None:
        if stats.min_token_id is not None and stats.min_token_id < 0:
            raise DataError(f"{bin_path}: holds negative token id {stats.min_token_id}; the file is corrupt, re-run preprocessing")
        if stats.max_token_id is not None and stats.max_token_id >= vocab_size:
            raise DataError(
                f"{bin_path}: holds token id {stats.max_token_id}, outside the model's vocabulary of {vocab_size} "
                "(model.vocab_size); preprocess with the model's tokenizer or raise model.vocab_size"
            )
    return stats


class IndexedReader:
    """Read-only access to sequences and documents, for inspection and tests."""

    def __init__(self, prefix: str) -> None:
        self.prefix = normalize_prefix(str(prefix))
        self.stats = check_indexed_dataset(self.prefix)
        self.index = read_index(self.prefix)
        self._data = np.memmap(self.prefix + ".bin", mode="r", dtype=self.index.dtype)
        self._itemsize = np.dtype(self.index.dtype).itemsize

    def __len__(self) -> int:
        return int(self.index.lengths.size)

    @property
    def num_documents(self) -> int:
        return int(self.index.doc_indices.size - 1)

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.index.pointers[i]) // self._itemsize
        return np.asarray(self._data[start : start + int(self.index.lengths[i])])

    def document(self, i: int) -> np.ndarray:
        """All sequences of document i, concatenated."""
        lo, hi = int(self.index.doc_indices[i]), int(self.index.doc_indices[i + 1])
        if hi <= lo:
            return np.zeros(0, dtype=self.index.dtype)
        start = int(self.index.pointers[lo]) // self._itemsize
        count = int(self.index.lengths[lo:hi].sum())
        return np.asarray(self._data[start : start + count])

    def document_lengths(self) -> np.ndarray:
        """Tokens per document."""
        csum = np.concatenate([[0], np.cumsum(self.index.lengths, dtype=np.int64)])
        return csum[self.index.doc_indices[1:]] - csum[self.index.doc_indices[:-1]]
