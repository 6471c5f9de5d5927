"""Micro-batch order (MegatronPretrainingSampler semantics) and exact resumption."""

from __future__ import annotations

import pytest
import torch

from nemotron_train.data import DataLoaderState, build_datasets, make_eval_iterator, make_train_iterator
from nemotron_train.data.iterators import PretrainingSampler
from nemotron_train.errors import DataError
from test_data_helpers import blend_override, data_config, make_dataset, sample_texts


def test_sampler_splits_each_group_across_dp_ranks():
    r0 = list(PretrainingSampler(20, 0, micro_batch_size=2, dp_rank=0, dp_size=2))
    r1 = list(PretrainingSampler(20, 0, micro_batch_size=2, dp_rank=1, dp_size=2))
    assert r0[:3] == [[0, 1], [4, 5], [8, 9]] and r1[:3] == [[2, 3], [6, 7], [10, 11]]
    assert len(r0) == len(r1) == 5
    resumed = list(PretrainingSampler(20, 8, micro_batch_size=2, dp_rank=1, dp_size=2))
    assert resumed == r1[2:]
    assert list(PretrainingSampler(10, 0, 2, 0, 2))[-1] == [4, 5]  # the partial last group is dropped


def test_cyclic_sampler_wraps():
    it = iter(PretrainingSampler(6, 4, micro_batch_size=2, dp_rank=0, dp_size=2, cyclic=True))
    assert [next(it) for _ in range(3)] == [[4, 5], [2, 3], [0, 1]]


def test_sampler_rejects_consumed_beyond_the_data():
    with pytest.raises(DataError, match="consumed_samples=50 is beyond the 40 samples"):
        PretrainingSampler(40, 50, 2, 0, 1)


@pytest.fixture(scope="module")
def train_ds_and_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iter")
    a = make_dataset(tmp, "a", sample_texts(150, seed=1))
    b = make_dataset(tmp, "b", sample_texts(150, seed=2))
    cfg = data_config(tmp, [blend_override([(a, 0.7), (b, 0.3)]), "train.steps=20", "data.split='90,10,0'"])
    train, valid, _ = build_datasets(cfg)
    return train, valid, cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_sees_exactly_the_uninterrupted_samples(train_ds_and_cfg, dp_size):
    train, _, cfg = train_ds_and_cfg
    per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)  # micro-batches per step
    for rank in range(dp_size):
        full = _take(make_train_iterator(train, cfg, rank, dp_size, 0), 6 * per_step)
        first = make_train_iterator(train, cfg, rank, dp_size, 0)
        head = _take(first, 3 * per_step)
        assert first.state.consumed_samples == 3 * cfg.train.global_batch_size
        tail = _take(make_train_iterator(train, cfg, rank, dp_size, first.state.consumed_samples), 3 * per_step)
        assert _equal(full, head + tail)
    batch = full[0]
    assert batch["tokens"].shape == (cfg.train.micro_batch_size, cfg.train.seq_length)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32


def test_dp_ranks_together_cover_the_global_batch(train_ds_and_cfg):
    train, _, cfg = train_ds_and_cfg
    one = _take(make_train_iterator(train, cfg, 0, 1, 0), 4)  # 4 micro-batches of 2 = one global batch
    r0 = _take(make_train_iterator(train, cfg, 0, 2, 0), 2)
    r1 = _take(make_train_iterator(train, cfg, 1, 2, 0), 2)
    # Group g of mbs*dp samples: rank 0 takes its first mbs, rank 1 the next.
    assert torch.equal(torch.cat([one[0]["tokens"], one[1]["tokens"]]), torch.cat([r0[0]["tokens"], r1[0]["tokens"]]))
    assert torch.equal(torch.cat([one[2]["tokens"], one[3]["tokens"]]), torch.cat([r0[1]["tokens"], r1[1]["tokens"]]))


def test_loader_workers_keep_the_order(train_ds_and_cfg):
    train, _, cfg = train_ds_and_cfg
    from dataclasses import replace

    cfg2 = replace(cfg, data=replace(cfg.data, num_workers=2))
    assert _equal(_take(make_train_iterator(train, cfg, 0, 1, 16), 5), _take(make_train_iterator(train, cfg2, 0, 1, 16), 5))


def test_train_iterator_ends_with_the_data(train_ds_and_cfg):
    train, _, cfg = train_ds_and_cfg
    start = (len(train) // 8 - 1) * 8
    it = make_train_iterator(train, cfg, 0, 1, start)
    assert len(_take(it, 4)) == 4
    with pytest.raises(StopIteration):
        next(it)


def test_eval_iterator_restarts_and_wraps(train_ds_and_cfg):
    _, valid, cfg = train_ds_and_cfg
    n = len(valid) // 2 + 3  # more micro-batches than the validation set holds
    a = _take(make_eval_iterator(valid, cfg, 0, 1), n)
    b = _take(make_eval_iterator(valid, cfg, 0, 1), 2)
    assert _equal(a[:2], b)


def test_data_loader_state_roundtrip():
    state = DataLoaderState(consumed_samples=1234)
    assert DataLoaderState.from_state_dict(state.state_dict()) == state
