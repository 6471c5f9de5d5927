"""Preprocessing inputs: JSONL, JSONL.gz and Parquet files cut into work units.

A JSONL unit is a block of whole lines (about `block_bytes`) read by the main process and
tagged with its file and first line number, so workers never re-read or seek and an error
can name `file:line`. A Parquet unit is one row group, read by the worker itself.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from nemotron_train.errors import BadInputError, DataError

DEFAULT_BLOCK_BYTES = 1 << 20
_GLOB_CHARS = set("*?[")


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named by `patterns` (paths or globs, globs sorted), each once, in order."""
    files: List[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"--input {pattern!r}: the glob matches no files")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"--input {pattern!r}: file not found")
    seen, out = set(), []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def input_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith(".gz"):
        return "jsonl.gz"
    return "jsonl"


@dataclass
class WorkUnit:
    path: str
    kind: str  # jsonl | parquet
    first_line: int = 1  # JSONL: line number of the block's first line; Parquet: first row (1-based)
    data: bytes = b""
    row_group: int = -1
    progress_bytes: int = 0  # input bytes (as stored on disk) this unit accounts for


@dataclass
class ParsedUnit:
    """Texts per key, aligned across keys (a record bad for one key is dropped for all)."""

    texts: Dict[str, List[Any]]
    records: int = 0
    bad: List[Tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)


def total_input_bytes(files: Sequence[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def _jsonl_blocks(path: str, block_bytes: int) -> Iterator[WorkUnit]:
    raw = open(path, "rb")
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if input_kind(path) == "jsonl.gz" else raw
    line_no, carry, last_pos = 1, b"", 0
    try:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError) as exc:  # corrupt or truncated gzip
                raise DataError(f"{path}: cannot read past line {line_no}: {exc}") from None
            if not chunk:
                break
            chunk = carry + chunk
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                carry = chunk
                continue
            block, carry = chunk[:cut], chunk[cut:]
            pos = raw.tell()
            yield WorkUnit(path, "jsonl", line_no, block, progress_bytes=pos - last_pos)
            last_pos = pos
            line_no += block.count(b"\n")
        if carry:
            yield WorkUnit(path, "jsonl", line_no, carry, progress_bytes=raw.tell() - last_pos)
        elif raw.tell() > last_pos:
            yield WorkUnit(path, "jsonl", line_no, b"", progress_bytes=raw.tell() - last_pos)
    finally:
        stream.close()
        raw.close()


def _parquet_units(path: str, keys: Sequence[str]) -> Iterator[WorkUnit]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(names)}); pick them with --json-keys")
    meta = pf.metadata
    size = os.path.getsize(path)
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) or 1
    first_row = 1
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        yield WorkUnit(path, "parquet", first_row, row_group=i, progress_bytes=size * rg.total_byte_size // total)
        first_row += rg.num_rows


def iter_units(files: Sequence[str], keys: Sequence[str], block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[WorkUnit]:
    for path in files:
        if input_kind(path) == "parquet":
            yield from _parquet_units(path, keys)
        else:
            yield from _jsonl_blocks(path, block_bytes)


def _check_value(value: Any, key: str) -> Optional[str]:
    """None if `value` is a string or a list of strings (Megatron's pre-split sentences)."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    if value is None:
        return f"key {key!r} is null"
    return f"key {key!r} holds {type(value).__name__}, expected a string"


def _parse_jsonl(unit: WorkUnit, keys: Sequence[str]) -> ParsedUnit:
    out = ParsedUnit({k: [] for k in keys})
    loads = json.loads
    columns = [out.texts[k] for k in keys]
    single = keys[0] if len(keys) == 1 else None
    for offset, line in enumerate(unit.data.split(b"\n")):
        if not line.strip():
            continue
        out.records += 1
        try:
            record = loads(line)
            if single is not None:  # the common case, without the per-key loop
                value = record[single]
                if type(value) is str:
                    columns[0].append(value)
                    continue
            values = [record[k] for k in keys]
        except (ValueError, UnicodeDecodeError) as exc:
            out.bad.append((unit.path, unit.first_line + offset, f"invalid JSON ({exc})"))
            continue
        except KeyError as exc:
            out.bad.append((unit.path, unit.first_line + offset, f"no key {exc.args[0]!r} (keys are chosen with --json-keys)"))
            continue
        except TypeError:
            out.bad.append((unit.path, unit.first_line + offset, f"expected a JSON object, got {type(record).__name__}"))
            continue
        reason = next((r for r in (_check_value(v, k) for k, v in zip(keys, values)) if r), None)
        if reason:
            out.bad.append((unit.path, unit.first_line + offset, reason))
            continue
        for column, value in zip(columns, values):
            column.append(value)
    return out


def _parse_parquet(unit: WorkUnit, keys: Sequence[str]) -> ParsedUnit:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=list(keys))
    cols = [table.column(k).to_pylist() for k in keys]
    out = ParsedUnit({k: [] for k in keys}, records=table.num_rows)
    for row, values in enumerate(zip(*cols)):
        reason = next((r for r in (_check_value(v, k) for k, v in zip(keys, values)) if r), None)
        if reason:
            out.bad.append((unit.path, unit.first_line + row, f"row {unit.first_line + row}: {reason}"))
            continue
        for k, v in zip(keys, values):
            out.texts[k].append(v)
    return out


def parse_unit(unit: WorkUnit, keys: Sequence[str], skip_bad: bool) -> ParsedUnit:
    parsed = _parse_parquet(unit, keys) if unit.kind == "parquet" else _parse_jsonl(unit, keys)
    if parsed.bad and not skip_bad:
        path, line, reason = parsed.bad[0]
        where = f"{path}" if unit.kind == "parquet" else f"{path}:{line}"
        raise BadInputError(f"{where}: {reason}; fix the record or pass --skip-bad-lines to skip such records")
    return parsed
