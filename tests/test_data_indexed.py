"""check_indexed_dataset: each broken-dataset case is an error naming the file."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from nemotron_train.data.indexed import IndexedWriter, check_indexed_dataset, read_trusted_stats
from nemotron_train.errors import DataError
from test_data_helpers import make_dataset


@pytest.fixture
def prefix(tmp_path):
    return make_dataset(tmp_path, "ds", ["hello world", "second document", "third"])


def test_valid_dataset_stats(prefix):
    stats = check_indexed_dataset(prefix, vocab_size=257)
    assert (stats.documents, stats.sequences, stats.dtype) == (3, 3, "uint16")
    assert stats.tokens == len("hello world") + len("second document") + len("third") + 3
    assert stats.max_token_id == 256  # the appended end-of-document token
    assert check_indexed_dataset(prefix + ".bin").prefix == prefix  # a .bin/.idx path is accepted


def test_missing_files(prefix):
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"ds_text_document\.bin: not found"):
        check_indexed_dataset(prefix)
    with pytest.raises(DataError, match=r"nothing\.bin and .*nothing\.idx: not found"):
        check_indexed_dataset(os.path.join(os.path.dirname(prefix), "nothing"))


def test_missing_idx(prefix):
    os.remove(prefix + ".idx")
    with pytest.raises(DataError, match=r"ds_text_document\.idx: not found"):
        check_indexed_dataset(prefix)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_header(prefix):
    _patch(prefix + ".idx", 0, b"NOTMEGA")
    with pytest.raises(DataError, match=r"ds_text_document\.idx: bad header"):
        check_indexed_dataset(prefix)


def test_bad_version(prefix):
    _patch(prefix + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"\.idx: index version 2 is not supported"):
        check_indexed_dataset(prefix)


def test_bad_dtype_code(prefix):
    _patch(prefix + ".idx", 17, bytes([42]))
    with pytest.raises(DataError, match="unknown token dtype code 42"):
        check_indexed_dataset(prefix)


def test_truncated_idx(prefix):
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".idx") - 8)
    with pytest.raises(DataError, match=r"\.idx: .*truncated or corrupt"):
        check_indexed_dataset(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="too short"):
        check_indexed_dataset(prefix)


@pytest.mark.parametrize("change", [-2, 4])
def test_bin_size_disagrees_with_index(prefix, change):
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size + change)
    with pytest.raises(DataError, match=rf"ds_text_document\.bin: {size + change} bytes, but .*describes {size} bytes"):
        check_indexed_dataset(prefix)


def test_corrupt_document_boundaries(prefix):
    n = 3
    doc_offset = 34 + n * 12
    _patch(prefix + ".idx", doc_offset + 8, struct.pack("<q", 5))  # boundary beyond the sequence count
    with pytest.raises(DataError, match="document boundaries"):
        check_indexed_dataset(prefix)


def test_token_id_beyond_vocab_from_sidecar(prefix):
    with pytest.raises(DataError, match=r"ds_text_document\.bin: holds token id 256, outside .* 200 \(model\.vocab_size\)"):
        check_indexed_dataset(prefix, vocab_size=200)


def test_token_id_beyond_vocab_found_by_scan_when_sidecar_is_stale(prefix):
    assert read_trusted_stats(prefix) is not None
    _patch(prefix + ".bin", 0, np.array([60000], dtype=np.uint16).tobytes())  # same size, new first token
    assert read_trusted_stats(prefix) is None  # the write changed the file's ctime
    with pytest.raises(DataError, match="holds token id 60000"):
        check_indexed_dataset(prefix, vocab_size=257)


def test_sidecar_is_ignored_when_it_lies(prefix):
    path = prefix + ".stats.json"
    record = json.loads(open(path).read())
    record["bin_file"]["size"] += 1
    open(path, "w").write(json.dumps(record))
    assert read_trusted_stats(prefix) is None
    assert check_indexed_dataset(prefix, vocab_size=257).max_token_id == 256  # scanned instead


def test_empty_dataset(tmp_path):
    writer = IndexedWriter(str(tmp_path / "empty"), np.uint16)
    writer.finalize()
    with pytest.raises(DataError, match=r"empty\.bin: the dataset holds no tokens"):
        check_indexed_dataset(str(tmp_path / "empty"))


def test_int32_tokens_for_large_vocab(tmp_path):
    writer = IndexedWriter(str(tmp_path / "big"), np.int32)
    writer.add(np.array([5, 100000, 7], dtype=np.int32), np.array([2, 1]))
    stats = writer.finalize()
    assert stats.max_token_id == 100000
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "big"))
    assert ds.index.dtype == np.int32 and ds[0].tolist() == [5, 100000] and ds[1].tolist() == [7]
    with pytest.raises(DataError, match="holds token id 100000"):
        check_indexed_dataset(str(tmp_path / "big"), vocab_size=65536)


def test_scan_result_is_remembered_for_files_without_sidecar(prefix, tmp_path, monkeypatch):
    import nemotron_train.data.indexed as indexed

    os.remove(prefix + ".stats.json")  # like a dataset written by another tool
    ranges = str(tmp_path / "cache" / "token_ranges.json")
    assert check_indexed_dataset(prefix, vocab_size=257, range_cache=ranges).max_token_id == 256

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(indexed, "scan_token_range", no_scan)
    assert check_indexed_dataset(prefix, vocab_size=257, range_cache=ranges).max_token_id == 256
    _patch(prefix + ".bin", 0, np.array([999], dtype=np.uint16).tobytes())  # changed: must scan again
    with pytest.raises(AssertionError, match="scanned again"):
        check_indexed_dataset(prefix, vocab_size=257, range_cache=ranges)
