"""DDP communication overlap and TP-rank-0 data loading, on CPU + gloo with two ranks.

Each layout (TP2 with sequence parallelism, PP2, DP2) trains the smoke model twice in the
same two processes, with megatron-core's gradient-reduce and parameter-gather overlap (and
small buckets, so there are several) off and on; the losses must be equal. Every rank records
which `.bin`/`.idx` files it opens (a Python audit hook sees every open, numpy's memmap
included): under TP2 only TP rank 0 may open any, and its losses equal DP2's, where both
ranks read, so the broadcast batches are the right ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

LAYOUTS = {
    "tp2": ["parallel.tp=2", "parallel.sp=true"],
    "pp2": ["parallel.tp=1", "parallel.sp=false", "parallel.pp=2"],
    "dp2": ["parallel.tp=1", "parallel.sp=false"],
}
OVERLAP = ["performance.overlap_grad_reduce=true", "performance.overlap_param_gather=true",
           "performance.bucket_size=4000"]


def _write_corpus(prefix: Path) -> None:
    from nemotron_train.data.indexed import IndexedWriter

    # Learnable text: each document counts up from a random start with a random stride.
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 90, size=400)
    docs = [(rng.integers(5, 500) + rng.integers(1, 4) * np.arange(n)) % 495 + 5 for n in lengths]
    tokens = np.concatenate(docs).astype(np.uint16)
    writer = IndexedWriter(str(prefix), np.uint16)
    writer.add(tokens, lengths)
    writer.finalize()


def _config_file(tmp: Path, prefix: Path) -> Path:
    cfg = tmp / "run.yaml"
    cfg.write_text(
        f"base: {SMOKE}\n"
        "data:\n  source: blend\n  split: '90,10,0'\n"
        f"  blend:\n    - path: {prefix}\n      weight: 1.0\n"
        f"  cache_dir: {tmp / 'cache'}\n"
        "train:\n  steps: 3\n  seq_length: 32\n  global_batch_size: 8\n  micro_batch_size: 2\n"
        "  eval_interval: 0\n  eval_iters: 1\n  log_interval: 1\n"
        "checkpoint:\n  interval: 0\n  save_at_end: false\n"
        "logging:\n  progress_bar: false\n"
    )
    return cfg


def _train_twice(rank: int, world: int, config: str, layout: list, out: str):
    """Worker: record dataset opens, train without then with overlap, return losses + opens."""
    opened = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].endswith((".bin", ".idx")):
            opened.append(args[0])

    sys.addaudithook(audit)
    from nemotron_train.config import load_config
    from nemotron_train.resolve import resolve_run
    from nemotron_train.training.loop import Trainer

    losses = {}
    for name, extra in (("off", []), ("on", OVERLAP)):
        run_dir = Path(out) / name
        cfg = load_config(config, [*layout, *extra, f"run.output_dir={run_dir}"])
        run = resolve_run(cfg, world)
        assert run.performance.overlap_grad_reduce is (name == "on")
        summary = Trainer(run).train()
        if rank == 0:
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            losses[name] = [x["loss"] for x in lines if "loss" in x]
            losses[name + "_val"] = summary["final_val_loss"]
    return {"losses": losses, "opened": opened}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    prefix = tmp / "corpus"
    _write_corpus(prefix)
    config = _config_file(tmp, prefix)
    return {name: run_distributed(_train_twice, 2, str(config), layout, str(tmp / name), timeout_s=300)
            for name, layout in LAYOUTS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_overlap_on_equals_overlap_off(runs, layout):
    losses = runs[layout][0]["losses"]
    assert len(losses["off"]) == 3 and all(np.isfinite(losses["off"]))
    # Equal up to float32 rounding: smaller buckets also re-shard the distributed optimizer
    # (each bucket is split over the DP ranks), which regroups the sum of squares of the
    # gradient norm that clipping uses; the gradients themselves are reduced identically.
    for a, b in zip(losses["on"] + [losses["on_val"]], losses["off"] + [losses["off_val"]]):
        assert abs(a - b) <= 1e-6 * abs(b), (layout, losses)


@pytest.mark.slow
def test_only_tp_rank0_reads_the_dataset_and_losses_are_unchanged(runs):
    tp_rank0, tp_rank1 = runs["tp2"]
    assert any(p.endswith(".bin") for p in tp_rank0["opened"])
    assert tp_rank1["opened"] == [], tp_rank1["opened"]
    # DP2: both ranks are TP rank 0 of their group and read.
    assert all(any(p.endswith(".idx") for p in r["opened"]) for r in runs["dp2"])
    # The broadcast batches are the read ones: TP2 trains on what DP2 (and one rank) trains on.
    tp, dp = tp_rank0["losses"]["off"], runs["dp2"][0]["losses"]["off"]
    for step, (a, b) in enumerate(zip(tp, dp), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: tp2 {a} vs dp2 {b}"


def _train_bf16(rank: int, world: int, config: str, out: str):
    import torch

    from nemotron_train.config import load_config
    from nemotron_train.resolve import resolve_run
    from nemotron_train.training.loop import Trainer

    cfg = load_config(config, ["parallel.tp=1", "parallel.sp=false", "precision.params_dtype=bf16", "train.steps=8",
                               f"run.output_dir={out}"])
    trainer = Trainer(resolve_run(cfg, world))
    summary = trainer.train()
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    main_params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return {
        "losses": [x["loss"] for x in lines if "loss" in x],
        "val": summary["final_val_loss"],
        "weight_dtypes": sorted({str(p.dtype) for p in trainer.model.module.parameters() if p.dim() == 2}),
        "fp32_params": sorted(n.rsplit(".", 1)[-1] for n, p in trainer.model.module.named_parameters()
                              if p.dtype == torch.float32),
        "main_dtypes": sorted({str(p.dtype) for p in main_params}),
        "bf16_tcfg": bool(trainer.tcfg.bf16) and trainer.tcfg.params_dtype == torch.bfloat16,
    }


@pytest.mark.slow
def test_bf16_parameters_train_end_to_end(tmp_path_factory):
    """The precision of every production recipe: bf16 weights, fp32 main weights in the optimizer."""
    tmp = tmp_path_factory.mktemp("bf16")
    prefix = tmp / "corpus"
    _write_corpus(prefix)
    (got,) = run_distributed(_train_bf16, 1, str(_config_file(tmp, prefix)), str(tmp / "run"), timeout_s=300)
    assert got["bf16_tcfg"] and got["weight_dtypes"] == ["torch.bfloat16"]
    # Only the Mamba mixer's SSM parameters stay fp32 by design (as in mamba-ssm/mcore).
    assert set(got["fp32_params"]) <= {"A_log", "D", "dt_bias"}, got["fp32_params"]
    assert got["main_dtypes"] == ["torch.float32"]
    losses = got["losses"]
    assert len(losses) == 8 and all(np.isfinite(losses)) and np.isfinite(got["val"])
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses  # it learns
