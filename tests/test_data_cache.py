"""Index-cache staleness: a dataset rewritten in place gets its cached indices rebuilt (or
a clear error), while a touched or copied one does not."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import yaml

from nemotron_train.data import build_datasets
from nemotron_train.data.cache import MANIFEST, load_manifest
from nemotron_train.errors import StaleCacheError
from test_data_helpers import blend_override, data_config, make_dataset, sample_texts


def _setup(tmp_path):
    a = make_dataset(tmp_path, "a", sample_texts(200, seed=1))
    b = make_dataset(tmp_path, "b", sample_texts(150, seed=2))
    cfg = data_config(tmp_path, [blend_override([(a, 0.5), (b, 0.5)]), "data.split='90,10,0'"])
    return a, b, cfg


def _cached(cfg_dir: str, pattern: str = "*"):
    return sorted(glob.glob(os.path.join(cfg_dir, f"*-{pattern}")))


def test_manifest_records_the_datasets(tmp_path):
    a, b, cfg = _setup(tmp_path)
    build_datasets(cfg)
    cache = str(tmp_path / "run" / "data_cache")
    records = load_manifest(cache)["datasets"]
    assert set(records) == {a, b}
    assert records[a]["bin_size"] == os.path.getsize(a + ".bin") and len(records[a]["idx_sha256"]) == 64
    assert os.path.isfile(os.path.join(cache, MANIFEST))
    assert len(_cached(cache, "GPTDataset-train-description.txt")) == 2
    assert len(_cached(cache, "BlendedDataset-train-description.txt")) == 1


def test_rewritten_dataset_is_rebuilt(tmp_path, capsys):
    a, b, cfg = _setup(tmp_path)
    build_datasets(cfg)
    cache = str(tmp_path / "run" / "data_cache")
    old_doc_index = np.load(_cached(cache, "GPTDataset-train-document_index.npy")[0])
    capsys.readouterr()
    make_dataset(tmp_path, "a", sample_texts(40, seed=3))  # same prefix, far fewer documents
    train, _, _ = build_datasets(cfg)
    out = capsys.readouterr().out
    assert "data cache: rebuilding" in out and "a_text_document: the dataset changed" in out
    # megatron-core alone would have reused indices pointing at documents that no longer exist
    member = next(m for m in train.datasets if m.dataset_path == a)
    assert int(np.max(member.document_index)) < 40 <= int(np.max(old_doc_index))
    for i in range(len(train)):
        if train.dataset_index[i] == 0:
            train[i]  # reads within the new files
            break


def test_stale_cache_error_when_not_rebuilding(tmp_path):
    a, b, cfg = _setup(tmp_path)
    build_datasets(cfg)
    make_dataset(tmp_path, "b", sample_texts(30, seed=4))
    with pytest.raises(StaleCacheError, match=r"b_text_document: the dataset changed .* prepare-cache"):
        build_datasets(cfg, rebuild_stale=False)


def test_touched_or_copied_dataset_is_still_fresh(tmp_path, capsys):
    a, b, cfg = _setup(tmp_path)
    build_datasets(cfg)
    capsys.readouterr()
    st = os.stat(a + ".idx")
    os.utime(a + ".idx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.utime(a + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_datasets(cfg, rebuild_stale=False)
    assert "rebuilding" not in capsys.readouterr().out
    assert load_manifest(str(tmp_path / "run" / "data_cache"))["datasets"][a]["idx_mtime_ns"] == st.st_mtime_ns + 10**9


def test_broken_cache_file_is_rebuilt(tmp_path, capsys):
    a, b, cfg = _setup(tmp_path)
    build_datasets(cfg)
    cache = str(tmp_path / "run" / "data_cache")
    victim = _cached(cache, "GPTDataset-train-sample_index.npy")[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    capsys.readouterr()
    build_datasets(cfg)
    assert "does not load" in capsys.readouterr().out
    np.load(victim)  # whole again


def test_prepare_cache_command(tmp_path, capsys):
    from nemotron_train.cli import main

    a, b, cfg = _setup(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run")}, "model": {"vocab_size": 512},
        "data": {"blend": [{"path": a, "weight": 1.0}, {"path": b, "weight": 2.0}], "tokenizer": {"type": "byte"}},
        "train": {"seq_length": 32, "micro_batch_size": 2, "global_batch_size": 8, "steps": 10, "eval_iters": 1},
    }))
    assert main(["prepare-cache", str(config)]) == 0
    out = capsys.readouterr().out
    assert "train           80 samples wanted" in out
    assert main(["prepare-cache", str(config), "--check"]) == 0
    make_dataset(tmp_path, "a", sample_texts(60, seed=5))
    assert main(["prepare-cache", str(config), "--check"]) == 2
    assert "stale" in capsys.readouterr().err
    assert main(["prepare-cache", str(config)]) == 0
    assert main(["prepare-cache", str(config), "--check"]) == 0
