"""Activation recomputation: config checks, chunking, bitwise-equal training with every
recompute variant (1 rank, TP2 + sequence parallel, PP2 through 1F1B), and the measured
saved-activation bytes of each mode next to `plan`'s estimate (bench/memory.py).

The equivalence runs train the smoke model in deterministic fp32 for two steps per variant
(tests/recompute_harness.py, all variants in one process per layout) and compare every
per-step loss and gradient with the run without recompute by exact equality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemotron_train.config import load_config
from nemotron_train.config.validate import validate_config
from nemotron_train.errors import ConfigError
from nemotron_train.models.recompute import recomputed_chunks

ROOT = Path(__file__).resolve().parents[1]
HARNESS = str(ROOT / "tests" / "recompute_harness.py")
sys.path.insert(0, str(ROOT / "tests"))
from recompute_harness import VARIANTS  # noqa: E402

LAYOUTS = {
    "1rank": (1, []),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": (2, ["parallel.pp=2", "model.pattern=M*-|M-"]),
}


# --------------------------------------------------------------------------- config and chunks


@pytest.mark.parametrize("overrides, needles", [
    (["recompute.granularity=selective"], ["recompute.modules", "core_attn, mlp, mamba, norm"]),
    (["recompute.modules=[mamba]"], ["recompute.modules", "recompute.granularity=selective"]),
    (["recompute.granularity=selective", "recompute.modules=[mlp,mlp]"], ["twice"]),
    (["recompute.granularity=full", "recompute.num_layers=0"], ["recompute.num_layers=0", "between 1 and"]),
    (["recompute.granularity=full", "recompute.num_layers=4", "parallel.pp=2", "model.pattern=M*-|M-"],
     ["recompute.num_layers=4", "(3)"]),
    (["recompute.granularity=sometimes"], ["recompute.granularity", "none, selective, full"]),
    (["recompute.granularity=selective", "recompute.modules=[attention]"], ["recompute.modules", "core_attn"]),
])
def test_bad_recompute_config_names_the_key(overrides, needles):
    with pytest.raises(ConfigError) as err:
        cfg = load_config(None, ["data.source=mock", "model.pattern=M*-M-", "model.num_layers=5", *overrides])
        validate_config(cfg, 2 if "parallel.pp=2" in overrides else 1)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_full_recompute_refuses_partial_cuda_graphs():
    cfg = load_config(ROOT / "configs" / "nemotron_h_56b_pretrain.yaml",
                      ["recompute.granularity=full", "recompute.modules=[]"])
    with pytest.raises(ConfigError, match="cuda_graph_scope=\\['mamba'\\].*full-iteration CUDA graph"):
        validate_config(cfg, cfg.launch.nproc_per_node * cfg.launch.nnodes)


def test_chunks_cover_the_stage():
    assert recomputed_chunks(5, None, 2) == [(0, 5, False)]
    assert recomputed_chunks(5, "uniform", 2) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert recomputed_chunks(5, "block", 2) == [(0, 1, True), (1, 2, True), (2, 5, False)]
    assert recomputed_chunks(2, "block", 3) == [(0, 1, True), (1, 2, True)]


# --------------------------------------------------------------------------- bitwise equivalence


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every variant trained in every layout: {layout: {variant: [per-rank results]}}."""
    from nemotron_train.platform import free_port

    root = tmp_path_factory.mktemp("recompute")
    out = {}
    for layout, (nproc, overrides) in LAYOUTS.items():
        cmd = [sys.executable, HARNESS, "--out", str(root / layout), *overrides]
        if nproc > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        out[layout] = {v: [torch.load(root / layout / f"{v}.rank{r}.pt") for r in range(nproc)] for v in VARIANTS}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "none"])
def test_recompute_is_bitwise_equal_to_none(trained, layout, variant):
    for rank, (ref, got) in enumerate(zip(trained[layout]["none"], trained[layout][variant])):
        assert got["losses"] == ref["losses"], (rank, got["losses"], ref["losses"])
        assert len(ref["grads"]) == 2
        for step, (ref_g, got_g) in enumerate(zip(ref["grads"], got["grads"])):
            assert set(got_g) == set(ref_g)
            nonzero = 0
            for name, g in ref_g.items():
                assert torch.equal(got_g[name], g), (rank, step, name, (got_g[name] - g).abs().max().item())
                nonzero += int(g.abs().sum() > 0)
            assert nonzero >= len(ref_g) - 1  # gradients reached (nearly) every tensor
    # The two steps differ (the update was applied), so the second step is a real check.
    ref = trained[layout]["none"][0]
    assert ref["losses"][0] != ref["losses"][1]


# --------------------------------------------------------------------------- measured memory


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--shapes", "smoke,smoke-tp2-sp",
                           "--no-write", "--json", str(out)], capture_output=True, text=True, env=_env(), timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads(out.read_text())
    return {shape: {r["mode"]: {place: (meas, est) for place, meas, est in r["rows"]} for r in rows if r["shape"] == shape}
            for shape in ("smoke", "smoke-tp2-sp")}


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["smoke", "smoke-tp2-sp"])
def test_measured_activation_bytes_drop_and_match_plan(measured, shape):
    by_mode = measured[shape]
    assert len(by_mode) == 8
    none = by_mode["none"]["total"][0]
    for mode, rows in by_mode.items():
        for place, (meas, est) in rows.items():
            if meas:
                assert abs(est / meas - 1) <= 0.10, (mode, place, meas, est)
        if mode != "none":
            assert rows["total"][0] < none, mode  # every mode actually frees something
    assert by_mode["full uniform/1"]["total"][0] < 0.4 * none
    assert by_mode["selective mamba"]["Mamba-2"][0] < 0.5 * by_mode["none"]["Mamba-2"][0]
    assert by_mode["selective mlp"]["MLP"][0] < by_mode["none"]["MLP"][0]
    assert by_mode["selective norm"]["attention"][0] < by_mode["none"]["attention"][0]


# --------------------------------------------------------------------------- te spec fields


@pytest.mark.parametrize("overrides, expected", [
    (["recompute.granularity=selective", "recompute.modules=[norm,mamba,core_attn,mlp]"],
     {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}),
    (["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=4", "recompute.modules=[]",
      "performance.cuda_graph_impl=none"],
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 4}),
])
def test_te_spec_recompute_fields_are_accepted_by_mcore(overrides, expected):
    """For the GPU spec, planned without a GPU: the fields megatron-core gets, and that its
    TransformerConfig accepts them with FP8 delayed scaling (which refuses `layernorm`)."""
    from megatron.core.transformer import TransformerConfig

    from nemotron_train.commands.plan import resolve_for_device
    from nemotron_train.models.build import transformer_kwargs

    cfg = load_config(ROOT / "configs" / "nemotron_h_56b_pretrain.yaml", ["precision.fp8.recipe=delayed",
                                                                          "precision.fp8.first_last_layers_bf16=0",
                                                                          "performance.tp_comm_overlap=false", *overrides])
    run = resolve_for_device(cfg, cfg.launch.nproc_per_node * cfg.launch.nnodes, "h100")
    assert run.spec == "te"
    kwargs = transformer_kwargs(run)
    assert {k: kwargs[k] for k in expected} == expected
    TransformerConfig(**kwargs)


# --------------------------------------------------------------------------- MFU and HFU


def test_plan_hardware_flops_add_the_recomputed_forward(tmp_path, capsys):
    from nemotron_train.models.cost import compute_plan
    from nemotron_train.training.metrics import MetricsLogger

    base = ["data.source=mock", f"run.output_dir={tmp_path}", "logging.progress_bar=false"]
    none = compute_plan(load_config(ROOT / "configs" / "smoke.yaml", base))
    full = compute_plan(load_config(ROOT / "configs" / "smoke.yaml", base + ["recompute.granularity=full"]))
    assert none["hardware_flops_per_token"] == none["flops_per_token"] == full["flops_per_token"]
    # Uniform full recompute repeats every layer's forward once: + (fwd+bwd)/3 minus the logits.
    layers = sum(v for k, v in full["flops_per_token_breakdown"].items() if k != "logits")
    assert full["hardware_flops_per_token"] == pytest.approx(full["flops_per_token"] + layers / 3)

    cfg = load_config(ROOT / "configs" / "smoke.yaml", base + ["recompute.granularity=full"])
    logger = MetricsLogger(cfg, True, full["flops_per_token"], 1, "cpu",
                           hardware_flops_per_token=full["hardware_flops_per_token"])
    logger.start(1)
    logger.train_step(1, 2.0, 1e-3, 1.0, step_time=0.5, tokens=1000, log=True)
    logger.close({})
    record = logger.history[-1]
    assert record["hfu"] == pytest.approx(record["mfu"] * full["hardware_flops_per_token"] / full["flops_per_token"])
    assert "HFU" in capsys.readouterr().out
