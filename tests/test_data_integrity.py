"""Datasets are trusted only for the exact files they were checked with: the index cache
hashes the `.idx` every time, the token-range sidecar is bound to the files' identity
(inode, size, mtime, ctime), and the writer commits a `.bin`/`.idx` pair with the `.idx`
last, fsync'd, so no crash leaves a mismatched pair."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import nemotron_train.data.indexed as indexed
from nemotron_train.data import build_datasets
from nemotron_train.data.indexed import IndexedWriter, check_indexed_dataset, read_index, read_trusted_stats
from nemotron_train.errors import DataError, StaleCacheError
from test_data_helpers import blend_override, data_config, make_dataset, sample_texts


def _write(prefix: str, tokens: np.ndarray, lengths) -> None:
    writer = IndexedWriter(prefix, np.uint16)
    writer.add(tokens, np.asarray(lengths))
    writer.finalize()


def test_cache_sees_an_index_replaced_with_its_times_kept(tmp_path):
    """`cp -p` / `rsync -a` of a re-preprocessed dataset keeps sizes and times: only the
    content of the .idx tells that the documents changed."""
    a = make_dataset(tmp_path, "a", sample_texts(200, seed=1))
    cfg = data_config(tmp_path, [blend_override([(a, 1.0)]), "data.split='90,10,0'"])
    build_datasets(cfg)
    old = os.stat(a + ".idx")
    arr = read_index(a)
    tokens = np.fromfile(a + ".bin", dtype=arr.dtype)
    # The same tokens cut into documents elsewhere: equal .bin, an .idx of equal size.
    _write(str(tmp_path / "recut"), tokens, np.roll(arr.lengths, 1))
    shutil.copyfile(tmp_path / "recut.idx", a + ".idx")
    os.utime(a + ".idx", ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.path.getsize(a + ".idx") == old.st_size
    with pytest.raises(StaleCacheError, match="a_text_document: the dataset changed"):
        build_datasets(cfg, rebuild_stale=False)


@pytest.fixture
def big(tmp_path):
    """3 MiB of tokens: the middle lies outside the first and last MiB."""
    prefix = str(tmp_path / "big")
    tokens = (np.arange(3 << 19) % 250).astype(np.uint16)
    _write(prefix, tokens, [len(tokens) // 8] * 8)
    return prefix, len(tokens)


def _patch_middle(prefix: str, n_tokens: int, value: int) -> None:
    with open(prefix + ".bin", "r+b") as f:
        f.seek(n_tokens)  # byte offset n_tokens = token n_tokens / 2
        f.write(np.array([value], dtype=np.uint16).tobytes())


def test_sidecar_is_not_trusted_after_an_edit_in_the_middle(big):
    prefix, n = big
    assert read_trusted_stats(prefix) is not None
    _patch_middle(prefix, n, 60000)
    assert read_trusted_stats(prefix) is None
    with pytest.raises(DataError, match="big.bin: holds token id 60000"):
        check_indexed_dataset(prefix, vocab_size=512)


def test_sidecar_is_not_trusted_for_a_replaced_file(big, tmp_path):
    """A file put in place with its times kept (`cp -p`) is another file: scanned again."""
    prefix, n = big
    shutil.copy2(prefix + ".bin", tmp_path / "copy.bin")
    _patch_middle(str(tmp_path / "copy"), n, 60000)
    st = os.stat(prefix + ".bin")
    os.replace(tmp_path / "copy.bin", prefix + ".bin")
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="holds token id 60000"):
        check_indexed_dataset(prefix, vocab_size=512)


def test_remembered_scan_is_not_trusted_after_an_edit_in_the_middle(big, tmp_path, monkeypatch):
    prefix, n = big
    os.remove(prefix + ".stats.json")
    ranges = str(tmp_path / "ranges.json")
    monkeypatch.setattr(indexed, "_TIME_TICK_NS", 0)  # remember the scan at once
    assert check_indexed_dataset(prefix, vocab_size=512, range_cache=ranges).max_token_id == 249
    st = os.stat(prefix + ".bin")
    _patch_middle(prefix, n, 60000)
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # an editor that keeps the time
    with pytest.raises(DataError, match="holds token id 60000"):
        check_indexed_dataset(prefix, vocab_size=512, range_cache=ranges)


def test_a_crash_between_the_renames_leaves_no_mismatched_pair(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ds")
    _write(prefix, np.arange(100, dtype=np.uint16), [50, 50])
    real_replace = os.replace

    def crash_at_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(indexed.os, "replace", crash_at_idx)
    writer = IndexedWriter(prefix, np.uint16)
    writer.add(np.arange(100, 200, dtype=np.uint16), np.array([10, 90]))  # same size, other documents
    with pytest.raises(OSError, match="killed"):
        writer.finalize()
    monkeypatch.setattr(indexed.os, "replace", real_replace)
    # The old .idx is gone before the new .bin lands: the pair reads as missing, not as
    # documents [50, 50] over the new tokens.
    with pytest.raises(DataError, match=r"ds\.idx: not found"):
        check_indexed_dataset(prefix)
    assert read_trusted_stats(prefix) is None


def test_finalize_fsyncs_both_files_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(indexed.os, "fsync", record)
    prefix = str(tmp_path / "ds")
    _write(prefix, np.arange(10, dtype=np.uint16), [10])
    assert any(p.endswith(".bin" + f".{os.getpid()}.tmp") for p in synced)
    assert any(p.endswith(".idx" + f".{os.getpid()}.tmp") for p in synced)
    assert synced.count(str(tmp_path)) >= 2  # after removing the old .idx, after the renames
