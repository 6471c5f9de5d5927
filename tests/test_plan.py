"""`nemotron-train plan`: JSON and table output through the real CLI entry point, parameter
and memory accounting, Megatron's hybrid FLOPs formula, and config errors as exit codes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from nemotron_train import cli
from nemotron_train.config.loader import load_config
from nemotron_train.models.cost import compute_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE = str(CONFIGS / "smoke.yaml")
B56 = str(CONFIGS / "nemotron_h_56b_pretrain.yaml")
GIB = 1024**3


@pytest.fixture(autouse=True)
def _only_plan_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exercise the real main() with only the command under test registered, so the test does
    # not depend on (or pay the import cost of) the other subcommands.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["nemotron_train.commands.plan"])
    for var in ("NEMOTRON_DATA", "NEMOTRON_TOKENIZER", "NEMOTRON_RUNS"):
        monkeypatch.delenv(var, raising=False)


def run_plan(args: List[str], capsys: pytest.CaptureFixture[str]) -> Dict[str, Any]:
    rc = cli.main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


def run_fail(args: List[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = cli.main(["plan", *args])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.out == ""
    return captured.err


def megatron_hybrid_flops_per_token(cfg: Any) -> float:
    """Megatron-LM's `num_floating_point_operations` hybrid branch (batch 1) divided by seq."""
    m, s = cfg.model, cfg.train.seq_length
    h, types = m.hidden_size, m.pattern.replace("|", "")
    p = m.kv_channels * m.num_attention_heads / h
    attn = 4 * s * h * p * (h + h * (m.num_query_groups / m.num_attention_heads) + s / 2)
    mlp = 4 * (m.ffn_hidden_size / h) * s * h**2
    d_in = 2 * h  # Megatron hard-codes the Mamba expand factor
    mamba = (2 * s * h * (2 * d_in + 2 * m.mamba_num_groups * m.mamba_state_dim + m.mamba_num_heads)
             + 7 * s * d_in * m.mamba_state_dim + 2 * s * d_in * h)
    fwd = types.count("*") * attn + types.count("-") * mlp + types.count("M") * mamba + 2 * s * h * m.vocab_size
    return 3 * fwd / s


# The 56B on 4 uneven pipeline stages (30/30/30/28 layers) over 64 nodes: exercises the stage
# split, per-stage memory and 1F1B in-flight micro-batches (the shipped recipe uses PP1).
B56_PP4 = [B56, "parallel.pp=4", "launch.nnodes=64", "recompute.granularity=none", "recompute.modules=[]",
           "model.pattern=M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*|-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M|"
           "-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-|M-M-M*-M-M-M-M-M*-M-M-M-M-M-"]


def test_plan_56b_json_is_sane_and_instant(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    plan = run_plan(B56_PP4, capsys)
    assert time.perf_counter() - start < 2.0
    assert plan["total_params"] == 56_324_350_464
    assert plan["world_size"] == 512
    assert plan["parallel"] == {"tp": 8, "pp": 4, "cp": 1, "dp": 16, "sp": True}
    assert [st["num_layers"] for st in plan["stages"]] == [30, 30, 30, 28]
    assert [st["first_layer"] for st in plan["stages"]] == [0, 30, 60, 90]
    assert "".join(st["layers"] for st in plan["stages"]) == load_config(B56).model.pattern
    assert plan["layer_counts"] == {"Mamba-2": 54, "attention": 10, "MLP": 54}
    # TP8 x PP4 shards ~56B over 32 GPUs; replicated norms and uneven stages add a little.
    assert plan["total_params"] / 32 < plan["params_per_rank"] < 1.1 * plan["total_params"] / 32
    assert 10 * GIB < plan["memory_per_gpu_bytes"] < 80 * GIB
    assert plan["memory_heaviest_stage"] == 0  # 1F1B keeps pp micro-batches in flight there
    assert [st["microbatches_in_flight"] for st in plan["stages"]] == [4, 3, 2, 1]
    assert plan["num_microbatches"] == 48
    assert plan["tokens_per_step"] == 768 * 8192


def test_flops_per_token_near_6n_and_equal_to_megatron(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (B56, str(CONFIGS / "nemotron_h_8b_pretrain.yaml"), SMOKE):
        plan = run_plan([path], capsys)
        ratio = plan["flops_per_token"] / (6 * plan["total_params"])
        assert 0.9 < ratio < 1.15, (path, ratio)
        assert plan["flops_per_token"] == pytest.approx(megatron_hybrid_flops_per_token(load_config(path)), rel=1e-12)
        assert plan["flops_per_step"] == pytest.approx(plan["flops_per_token"] * plan["tokens_per_step"])
        assert sum(plan["flops_per_token_breakdown"].values()) == pytest.approx(plan["flops_per_token"])


def test_attention_flops_grow_with_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    short = run_plan([SMOKE, "train.seq_length=64"], capsys)["flops_per_token_breakdown"]
    long = run_plan([SMOKE, "train.seq_length=512"], capsys)["flops_per_token_breakdown"]
    assert long["attention"] > short["attention"]
    assert long["Mamba-2"] == short["Mamba-2"] and long["MLP"] == short["MLP"]


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", B56]) == 0
    out = capsys.readouterr().out
    assert "56.32B" in out and "tp 8 x pp 1" in out and "memory per GPU" in out
    assert "device h100" in out and "headroom" in out and "recompute selective: mamba" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "GiB" in line]
    assert len(rows) == 1


def test_world_size_option_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_plan([B56, "--world-size", "32"], capsys)
    assert plan["parallel"]["dp"] == 4 and plan["num_microbatches"] == 192
    plan = run_plan([SMOKE, "launch.nproc_per_node=4"], capsys)
    assert plan["world_size"] == 4 and plan["parallel"]["dp"] == 2


def test_per_rank_params_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["parallel.tp=1", "parallel.sp=false"]
    one = run_plan([SMOKE, *base, "launch.nproc_per_node=1"], capsys)
    assert one["params_per_rank"] == one["total_params"]
    two = run_plan([SMOKE, *base, "parallel.pp=2", "launch.nproc_per_node=2"], capsys)
    assert sum(st["params_per_rank"] for st in two["stages"]) == two["total_params"]
    tp = run_plan([SMOKE], capsys)  # tp=2: everything but the norms is split in two
    h, layers = 64, 8
    norms = h * (layers + 1)
    assert 2 * (tp["params_per_rank"] - norms) == tp["total_params"] - norms


def test_tied_embeddings(capsys: pytest.CaptureFixture[str]) -> None:
    untied = run_plan([SMOKE], capsys)
    tied = run_plan([SMOKE, "model.untie_embeddings_and_output_weights=false"], capsys)
    vocab_h = 512 * 64
    assert untied["total_params"] - tied["total_params"] == vocab_h
    # With pipeline stages the last one keeps its own copy of the tied embedding.
    pp = run_plan([SMOKE, "model.untie_embeddings_and_output_weights=false", "parallel.pp=2",
                   "launch.nproc_per_node=4"], capsys)
    assert sum(st["params_per_rank"] for st in pp["stages"]) > tied["params_per_rank"]


def test_memory_accounting(capsys: pytest.CaptureFixture[str]) -> None:
    dp1 = run_plan([SMOKE], capsys)
    dp2 = run_plan([SMOKE, "--world-size", "4"], capsys)
    # The distributed optimizer shards fp32 state over data parallelism; weights and grads do not.
    assert dp2["memory_breakdown_bytes"]["optimizer"] * 2 == pytest.approx(dp1["memory_breakdown_bytes"]["optimizer"], abs=2)
    assert dp2["memory_breakdown_bytes"]["weights"] == dp1["memory_breakdown_bytes"]["weights"]
    n = dp1["params_per_rank"]
    assert dp1["memory_breakdown_bytes"]["weights"] == 4 * n  # fp32 params
    assert dp1["memory_breakdown_bytes"]["optimizer"] == 8 * n  # Adam moments, no separate master copy
    bf16 = run_plan([SMOKE, "precision.params_dtype=bf16"], capsys)
    assert bf16["memory_breakdown_bytes"]["weights"] == 2 * n
    assert bf16["memory_breakdown_bytes"]["optimizer"] == 12 * n  # + fp32 master
    no_sp = run_plan([SMOKE, "parallel.sp=false"], capsys)
    assert no_sp["stages"][0]["activation_bytes_per_microbatch"] > dp1["stages"][0]["activation_bytes_per_microbatch"]
    bigger = run_plan([SMOKE, "train.micro_batch_size=8"], capsys)
    assert bigger["stages"][0]["activation_bytes_per_microbatch"] == 2 * dp1["stages"][0]["activation_bytes_per_microbatch"]


def test_compute_plan_defaults_world_size_from_launch() -> None:
    cfg = load_config(CONFIGS / "nemotron_h_8b_pretrain.yaml")
    plan = compute_plan(cfg)
    assert plan["world_size"] == cfg.launch.nproc_per_node * cfg.launch.nnodes
    assert plan["total_params"] == 8_100_852_736


@pytest.mark.parametrize("args, needles", [
    ([SMOKE, "model.hiden_size=32"], ["model.hiden_size", "model.hidden_size"]),
    ([SMOKE, "parallel.tp=4", "launch.nproc_per_node=4"], ["model.num_query_groups=2", "parallel.tp=4"]),
    ([SMOKE, "model.pattern=M*-M"], ["model.pattern", "model.num_layers=8"]),
    ([SMOKE, "parallel.pp=3", "--world-size", "6"], ["parallel.pp=3", "`|`"]),
    ([B56, "parallel.pp=4"], ["model.pattern", "parallel.pp=4", "`|`"]),
    ([B56, "--world-size", "100"], ["world size 100", "parallel.tp"]),
])
def test_bad_config_exits_nonzero_naming_key(args: List[str], needles: List[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    err = run_fail(args, capsys)
    assert err.startswith("nemotron-train plan: error:")
    for needle in needles:
        assert needle in err, (needle, err)


def test_unknown_key_in_file_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {SMOKE}\ntrain:\n  micro_batch: 2\n")
    err = run_fail([str(bad)], capsys)
    assert "train.micro_batch" in err and str(bad) in err and "train.micro_batch_size" in err
