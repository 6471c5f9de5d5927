"""The bundled corpus and BPE: shipped, license-clean, structured, tokenized on first use;
plus the inspection command and the rank-0-first build under torch.distributed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.make_corpus import generate
from nemotron_train.data import build_datasets, build_tokenizer, make_train_iterator
from nemotron_train.data.bundled import CORPUS_DIR, CORPUS_FILE, TOKENIZER_FILE, read_corpus
from nemotron_train.data.tokenizers import load_tokenizer
from test_data_helpers import blend_override, data_config, make_dataset, sample_texts


def test_corpus_and_tokenizer_are_shipped_small_and_licensed():
    assert CORPUS_FILE.is_file() and TOKENIZER_FILE.is_file()
    assert 300_000 < CORPUS_FILE.stat().st_size < 2_000_000
    readme = (CORPUS_DIR / "README.md").read_text()
    assert "CC0" in readme and "public domain" in readme
    tok = load_tokenizer("bundled")
    assert tok.vocab_size <= 512 and tok.eod == 0


def test_shipped_corpus_is_what_the_generator_writes():
    docs = read_corpus()
    assert docs == generate(len(docs), seed=0)


def test_corpus_has_learnable_structure():
    """Repeated vocabulary and grammar: a bigram model of the BPE tokens predicts far better
    than chance, so a small model's loss can fall well below log(vocab)."""
    docs = read_corpus()
    words = " ".join(docs).split()
    assert len(docs) >= 10_000 and len(words) > 500_000 and len(set(words)) < 1_500
    tok = load_tokenizer("bundled")
    ids, _ = tok.encode_to_array(docs[:4000], np.int64, tok.eod)
    pairs = np.bincount(ids[:-1] * 512 + ids[1:], minlength=512 * 512).reshape(512, 512).astype(np.float64)
    rows = pairs.sum(axis=1, keepdims=True)
    p = np.divide(pairs, rows, out=np.zeros_like(pairs), where=rows > 0)
    cond_entropy = -np.sum(pairs / pairs.sum() * np.log(np.where(p > 0, p, 1.0)))
    assert cond_entropy < 0.4 * np.log(512)


def test_bundled_tokenizer_roundtrips_corpus_text():
    tok = load_tokenizer("bundled")
    for doc in read_corpus()[:200]:
        assert tok.decode(tok.encode(doc)) == doc


def test_bundled_source_tokenizes_once_and_loads(tmp_path, capsys):
    overrides = ["data.source=bundled", "data.tokenizer.type=bundled", "train.seq_length=64"]
    cfg = data_config(tmp_path, overrides)
    tok = build_tokenizer(cfg)
    train, valid, test = build_datasets(cfg, tok)
    assert "tokenized the bundled corpus" in capsys.readouterr().out
    assert list((tmp_path / "run" / "data_cache" / "bundled").glob("corpus_*_text_document.bin"))
    assert len(train) >= 80 and valid is not None and test is None
    text = tok.decode(next(make_train_iterator(train, cfg, 0, 1, 0))["tokens"][0].tolist())
    assert any(name in text for name in ("Anna", "Ben", "Clara", "David", "Emma", "Finn", "Grace", "the"))
    build_datasets(cfg, tok)
    assert "tokenized the bundled corpus" not in capsys.readouterr().out  # reused from the cache


def test_smoke_config_data_builds(tmp_path):
    from nemotron_train.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml", [f"run.output_dir={tmp_path}"])
    train, valid, _ = build_datasets(cfg)
    assert len(train) >= cfg.train.steps * cfg.train.global_batch_size
    assert int(train[0]["tokens"].max()) < cfg.model.vocab_size


def test_inspect_prefix_and_blend(tmp_path, capsys):
    from data_tools.inspect import main

    prefix = make_dataset(tmp_path, "ins", sample_texts(50, seed=3))
    assert main([prefix, "--doc", "2"]) == 0
    out = capsys.readouterr().out
    assert "documents 50" in out and "length histogram" in out and "|" in out
    assert sample_texts(50, seed=3)[2][:40] in out  # decoded with the tokenizer recorded at preprocessing
    other = make_dataset(tmp_path, "other", sample_texts(50, seed=4))
    config = tmp_path / "c.yaml"
    cfg_text = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"vocab_size": 512},
                "data": {"split": "90,10,0", "blend": [{"path": prefix, "weight": 3}, {"path": other, "weight": 1}]},
                "train": {"seq_length": 16, "global_batch_size": 8, "micro_batch_size": 8, "steps": 100}}
    config.write_text(json.dumps(cfg_text))
    assert main(["--blend", str(config), "--samples", "400"]) == 0
    out = capsys.readouterr().out
    assert "0.7500    0.7500" in out and "0.2500    0.2500" in out
    assert main([str(tmp_path / "missing")]) == 2


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str, prefixes: list) -> None:
    import torch.distributed as dist

    from nemotron_train.errors import DataError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = data_config(Path(out_dir), [blend_override([(p, 1.0) for p in prefixes]), "data.split='90,10,0'"])
        try:
            train, _, _ = build_datasets(cfg)
            result = [train[i]["tokens"].tolist() for i in range(4)]
        except DataError as exc:
            result = f"DataError: {exc}"
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_build_rank0_first_and_shared_errors(tmp_path):
    import torch.multiprocessing as mp

    a = make_dataset(tmp_path, "a", sample_texts(100, seed=1))
    b = make_dataset(tmp_path, "b", sample_texts(100, seed=2))
    for name, prefixes in (("ok", [a, b]), ("bad", [a, str(tmp_path / "missing_text_document")])):
        out = tmp_path / name
        out.mkdir()
        mp.spawn(_dist_worker, args=(2, str(tmp_path / f"init_{name}"), str(out), prefixes), nprocs=2, join=True)
        r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
        if name == "ok":
            assert r0 == r1 and len(r0) == 4
        else:  # rank 0 found the problem; rank 1 raises it too instead of waiting at a barrier
            assert r0.startswith("DataError:") and "missing_text_document" in r0
            assert r1.startswith("DataError: data preparation failed on rank 0") and "missing_text_document" in r1
