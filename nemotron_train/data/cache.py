"""Staleness checks for megatron-core's index cache.

megatron-core names cached sample indices by a hash of their description (dataset path,
seed, sequence length, split, sample count, tokenizer) and trusts any file with a matching
name. Re-preprocessing a dataset in place keeps the name, so it would silently reuse
indices built for the old documents. We keep a sidecar, `nemotron_cache_manifest.json`,
with each dataset's file sizes, modification times and `.idx` checksum when its indices
were built. Sample indices depend on the `.idx` only (document lengths), and the `.idx` is
small next to the `.bin`, so it is hashed on every check: sizes and times alone would pass a
dataset replaced with `cp -p` or `rsync -a`, which keep them. Before building we compare:

- `.bin` size and `.idx` checksum equal: fresh (times that moved, by a copy or a touch, are
  updated);
- otherwise, or a cached entry names a dataset the manifest does not know: stale. Its
  cached files are deleted and rebuilt with a message, or `StaleCacheError` is raised.

Cached entries are also checked on their own: a description whose md5 does not match the
file name, or an index file that does not load, is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import numpy as np

from nemotron_train.errors import StaleCacheError

MANIFEST = "nemotron_cache_manifest.json"
_ENTRY_RE = re.compile(r"^([0-9a-f]{32})-([A-Za-z0-9_]+)-(train|valid|test)-(.+)$")


@dataclass
class CacheEntry:
    base: str  # <md5>-<Class>-<split>
    files: List[str] = field(default_factory=list)
    dataset_paths: Set[str] = field(default_factory=set)
    problem: Optional[str] = None


def _walk_dataset_paths(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "dataset_path" and isinstance(v, str):
                yield v
            else:
                yield from _walk_dataset_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_dataset_paths(v)


def scan_entries(cache_dir: str) -> Dict[str, CacheEntry]:
    """megatron-core's cached files, grouped per dataset split, with integrity problems."""
    entries: Dict[str, CacheEntry] = {}
    if not os.path.isdir(cache_dir):
        return entries
    for name in sorted(os.listdir(cache_dir)):
        m = _ENTRY_RE.match(name)
        if m:
            base = f"{m.group(1)}-{m.group(2)}-{m.group(3)}"
            entries.setdefault(base, CacheEntry(base)).files.append(os.path.join(cache_dir, name))
    for base, entry in entries.items():
        desc_path = os.path.join(cache_dir, f"{base}-description.txt")
        if not os.path.isfile(desc_path):
            entry.problem = "no description.txt"
            continue
        with open(desc_path, "rb") as f:
            text = f.read()
        if hashlib.md5(text, usedforsecurity=False).hexdigest() != base[:32]:
            entry.problem = "description.txt does not match the hash in its file name"
            continue
        try:
            entry.dataset_paths = set(_walk_dataset_paths(json.loads(text)))
        except ValueError:
            entry.problem = "description.txt is not JSON"
            continue
        for path in entry.files:
            if path.endswith(".npy"):
                try:
                    np.load(path, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError) as exc:
                    entry.problem = f"{os.path.basename(path)} does not load ({exc})"
                    break
    return entries


def _idx_sha256(prefix: str) -> str:
    h = hashlib.sha256()
    with open(prefix + ".idx", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _stat(prefix: str) -> Dict[str, int]:
    b, i = os.stat(prefix + ".bin"), os.stat(prefix + ".idx")
    return {"bin_size": b.st_size, "bin_mtime_ns": b.st_mtime_ns, "idx_size": i.st_size, "idx_mtime_ns": i.st_mtime_ns}


def load_manifest(cache_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(cache_dir, MANIFEST)) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("datasets"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"format": 1, "datasets": {}}


def save_manifest(cache_dir: str, manifest: Dict[str, Any]) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, MANIFEST)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _dataset_change(prefix: str, record: Optional[Dict[str, Any]], in_cache: bool) -> Optional[str]:
    """Why the cached indices of `prefix` are stale, or None (updates `record` in place)."""
    now = _stat(prefix)
    if record is None:
        return "its cached indices were built without a manifest entry (unknown dataset files)" if in_cache else None
    if record.get("bin_size") == now["bin_size"] and record.get("idx_sha256") == _idx_sha256(prefix):
        record.update(now)  # same content, new times (copied or touched)
        return None
    return (
        f"the dataset changed since its indices were built (.bin {record.get('bin_size')} -> {now['bin_size']} bytes, "
        f".idx {record.get('idx_size')} -> {now['idx_size']} bytes or different content)"
    )


def refresh_cache(
    cache_dir: str, prefixes: Sequence[str], rebuild: bool = True, log: Callable[[str], None] = print
) -> List[str]:
    """Delete stale or broken cached indices for `prefixes` and record their fingerprints.

    Returns the deleted entries. With `rebuild=False` a stale dataset raises
    `StaleCacheError` instead and nothing is deleted."""
    manifest = load_manifest(cache_dir)
    entries = scan_entries(cache_dir)
    doomed: Dict[str, str] = {base: e.problem for base, e in entries.items() if e.problem}
    records = manifest["datasets"]
    for prefix in prefixes:
        users = [b for b, e in entries.items() if prefix in e.dataset_paths]
        reason = _dataset_change(prefix, records.get(prefix), bool(users))
        if reason is None or not users:  # fresh, or nothing cached for it yet
            if reason is not None or prefix not in records:
                records[prefix] = {**_stat(prefix), "idx_sha256": _idx_sha256(prefix)}
            continue
        if not rebuild:
            raise StaleCacheError(
                f"{prefix}: {reason}; the index cache in {cache_dir} is stale. Rebuild it with "
                "`nemotron-train prepare-cache CONFIG` (or delete that directory)"
            )
        for base in users:
            doomed.setdefault(base, f"{prefix}: {reason}")
        records[prefix] = {**_stat(prefix), "idx_sha256": _idx_sha256(prefix)}
    if doomed and not rebuild:
        base, why = next(iter(doomed.items()))
        raise StaleCacheError(f"{cache_dir}: cached entry {base} is broken ({why}); rebuild it with `nemotron-train prepare-cache CONFIG`")
    for base, why in doomed.items():
        for path in entries[base].files:
            if os.path.exists(path):
                os.remove(path)
        log(f"data cache: rebuilding {base} in {cache_dir}: {why}")
    save_manifest(cache_dir, manifest)
    return sorted(doomed)
