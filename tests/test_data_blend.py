"""Blends through megatron-core's builder: realised shares, per-split blends, mock data and
every config error the data section can raise before training."""

from __future__ import annotations

import numpy as np
import pytest

from nemotron_train.data import build_datasets, build_tokenizer, check_data_config, split_sizes
from nemotron_train.data.datasets import realised_shares
from nemotron_train.errors import DataError, UserError
from test_data_helpers import blend_override, data_config, make_dataset, sample_texts


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    return [make_dataset(tmp, f"d{i}", sample_texts(120, seed=i)) for i in range(3)]


def test_sizes_follow_the_schedule(tmp_path):
    cfg = data_config(tmp_path)  # 10 steps of 8, eval every 5 steps with 2 iterations
    assert split_sizes(cfg) == [80, (10 // 5 + 1) * 2 * 8, 16]
    cfg = data_config(tmp_path, ["train.eval_interval=0"])
    assert split_sizes(cfg)[1] == 2 * 8


def test_blend_shares_follow_weights(tmp_path, three):
    weights = [0.5, 0.3, 0.2]
    cfg = data_config(tmp_path, [blend_override(list(zip(three, weights))), "train.steps=250", "data.split='90,10,0'"])
    train, valid, test = build_datasets(cfg)
    assert len(train) >= 250 * 8 and valid is not None and test is None
    members, counts = realised_shares(train, 2000)
    assert members == three
    np.testing.assert_allclose(counts / 2000, weights, atol=0.01)
    item = train[0]
    assert set(item) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == (32,) and item["tokens"].dtype == np.int64 or str(item["tokens"].dtype) == "torch.int64"
    assert bool((item["labels"][:-1] == item["tokens"][1:]).all())


def test_blend_is_deterministic_and_seeded(tmp_path, three):
    entries = blend_override([(three[0], 1), (three[1], 1)])
    a, _, _ = build_datasets(data_config(tmp_path / "a", [entries]))
    b, _, _ = build_datasets(data_config(tmp_path / "b", [entries]))
    c, _, _ = build_datasets(data_config(tmp_path / "c", [entries, "train.seed=8"]))
    assert all(bool((a[i]["tokens"] == b[i]["tokens"]).all()) for i in range(20))
    assert any(not bool((a[i]["tokens"] == c[i]["tokens"]).all()) for i in range(20))


def test_per_split_blends(tmp_path, three):
    cfg = data_config(tmp_path, [
        blend_override([(three[0], 0.6), (three[1], 0.4)], "train_blend"),
        blend_override([(three[2], 1.0)], "valid_blend"),
    ])
    train, valid, test = build_datasets(cfg)
    assert test is None
    assert valid.dataset_path == three[2] and len(valid) >= split_sizes(cfg)[1]
    assert realised_shares(train, 50)[0] == three[:2]


def test_mock_source(tmp_path):
    cfg = data_config(tmp_path, ["data.source=mock"])
    train, valid, test = build_datasets(cfg)
    assert len(train) >= 80 and valid is not None and test is not None
    assert train[3]["tokens"].shape == (32,)
    assert not (tmp_path / "run" / "data_cache").exists()  # mock data is never cached


def test_eval_iters_zero_means_no_eval_sets(tmp_path, three):
    cfg = data_config(tmp_path, [blend_override([(three[0], 1)]), "train.eval_iters=0"])
    _, valid, test = build_datasets(cfg)
    assert valid is None and test is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], r"data\.blend is empty"),
        (["data.blend=[{path: '', weight: 1}]"], r"data\.blend\[0\]: empty path"),
        (["BLEND:-0.5"], r"data\.blend\[1\] .*weight -0\.5 must be a non-negative"),
        (["BLEND:0"], None),  # one zero weight just drops that dataset
        (["ALLZERO"], r"every weight is zero"),
        (["BLEND:1", "TRAINBLEND"], r"exclusive"),
        (["BLEND:1", "data.split='abc'"], r"data\.split='abc'"),
        (["BLEND:1", "data.split='0,1,0'"], r"train share must be positive"),
        (["BLEND:1", "data.source=web"], r"data\.source='web'"),
        (["BLEND:1", "model.vocab_size=100"], r"has 257 tokens but model\.vocab_size is 100"),
    ],
)
def test_config_errors(tmp_path, three, overrides, message):
    resolved = []
    for o in overrides:
        if o.startswith("BLEND:"):
            resolved.append(blend_override([(three[0], 1.0), (three[1], float(o.split(":")[1]))]))
        elif o == "ALLZERO":
            resolved.append(blend_override([(three[0], 0), (three[1], 0)]))
        elif o == "TRAINBLEND":
            resolved.append(blend_override([(three[2], 1)], "train_blend"))
        else:
            resolved.append(o)
    if message is None:
        check_data_config(data_config(tmp_path, resolved))
        return
    # A value outside the schema's choices (data.source=web) is refused when the config loads
    # (ConfigError); the others when the data is checked (DataError): both are UserErrors.
    with pytest.raises(UserError, match=message):
        check_data_config(data_config(tmp_path, resolved))


def test_dataset_file_errors_name_the_file(tmp_path, three):
    cfg = data_config(tmp_path, [blend_override([(three[0], 1), (str(tmp_path / "gone_text_document"), 1)])])
    with pytest.raises(DataError, match=r"gone_text_document\.bin and .*\.idx: not found"):
        check_data_config(cfg)
    with pytest.raises(DataError, match="gone_text_document"):
        build_datasets(cfg)


def test_token_ids_beyond_model_vocab(tmp_path):
    from nemotron_train.data.indexed import IndexedWriter

    writer = IndexedWriter(str(tmp_path / "big_text_document"), np.uint16)
    writer.add(np.array([1, 2, 300, 4], dtype=np.uint16), np.array([2, 2]))
    writer.finalize()
    cfg = data_config(tmp_path, [blend_override([(str(tmp_path / "big_text_document"), 1)]), "model.vocab_size=257"])
    with pytest.raises(DataError, match=r"big_text_document\.bin: holds token id 300, outside .* 257"):
        check_data_config(cfg)


def test_split_without_documents_is_an_error(tmp_path):
    prefix = make_dataset(tmp_path, "tiny", ["one", "two", "three"])
    cfg = data_config(tmp_path, [blend_override([(prefix, 1)]), "data.split='99,1,0'"])
    with pytest.raises(DataError, match=r"tiny_text_document: the valid split .* gets no tokens"):
        build_datasets(cfg)


def test_build_tokenizer_kinds(tmp_path):
    tok = build_tokenizer(data_config(tmp_path, ["data.tokenizer.type=bundled"]))
    assert tok.vocab_size <= 512 and tok.decode(tok.encode("Anna went to the park.")) == "Anna went to the park."
    from test_data_helpers import make_hf_tokenizer

    path = make_hf_tokenizer(tmp_path)
    tok = build_tokenizer(data_config(tmp_path, ["data.tokenizer.type=hf", f"data.tokenizer.path={path}"]))
    assert tok.vocab_size == 400 and tok.eod == 0
