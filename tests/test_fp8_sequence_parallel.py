"""FP8 linears under tensor + sequence parallelism (2 gloo ranks): the all-gathered input is
quantised with one scale for the whole sequence, and forward/backward equal the same FP8
GEMMs written out on full tensors.

Run by pytest, this file starts itself under torchrun; each rank runs `_worker`."""

import os
import subprocess
import sys

import pytest
import torch

HIDDEN, FFN, SEQ, BATCH = 64, 96, 8, 2


def _worker() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemotron_train.fp8 import FP8ColumnParallelLinear, FP8Recipe, FP8RowParallelLinear, fp8_autocast
    from nemotron_train.fp8.quantize import quantize_current
    from nemotron_train.fp8.recipe import E4M3, E5M2, FP8RecipeState
    from nemotron_train.platform import init_distributed, setup_platform

    init_distributed(setup_platform())
    parallel_state.initialize_model_parallel(2, 1)
    rank, tp = dist.get_rank(), 2
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, sequence_parallel=True,
    )
    torch.manual_seed(0)  # CPU init draws the full weight on every rank, then slices it
    init = torch.nn.init.normal_
    col = FP8ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=False, gather_output=False)
    row = FP8RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=False, input_is_parallel=True,
                               skip_bias_add=False)
    w1_shards = _gather(col.weight.detach(), dist).chunk(tp, 0)  # each rank's [FFN/tp, HIDDEN]
    w2_shards = _gather(row.weight.detach(), dist, dim=1).chunk(tp, 1)  # each rank's [HIDDEN, FFN/tp]

    gen = torch.Generator().manual_seed(3)
    x_full = torch.randn(SEQ, BATCH, HIDDEN, generator=gen) * torch.linspace(0.1, 3, SEQ).view(SEQ, 1, 1)
    g_full = torch.randn(SEQ, BATCH, FFN, generator=gen) * 1e-2
    rows = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    cols = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    x = x_full[rows].clone().requires_grad_()
    q = lambda t, d=E4M3: quantize_current(t, d)  # noqa: E731

    with fp8_autocast(True, FP8RecipeState(FP8Recipe(format="hybrid"))):
        h, _ = col(x)
        out, _ = row(h.detach())
    h.backward(g_full[:, :, cols])

    # Column: one scale for the gathered sequence (the max over both ranks' shards).
    torch.testing.assert_close(h, q(x_full) @ q(w1_shards[rank]).t(), rtol=1e-5, atol=1e-6)
    wgrad = q(g_full[:, :, cols], E5M2).reshape(-1, FFN // tp).t() @ q(x_full).reshape(-1, HIDDEN)
    torch.testing.assert_close(col.weight.grad, wgrad, rtol=1e-5, atol=1e-7)
    dgrad = sum(q(g_full[:, :, c], E5M2) @ q(w) for c, w in zip(torch.arange(FFN).chunk(tp), w1_shards))
    torch.testing.assert_close(x.grad, dgrad[rows], rtol=1e-5, atol=1e-7)
    # Row: partial products of the hidden shards, reduce-scattered along the sequence.
    h_full = _gather(h.detach(), dist, dim=2)
    partial = sum(q(hs) @ q(w).t() for hs, w in zip(h_full.chunk(tp, 2), w2_shards))
    torch.testing.assert_close(out, partial[rows], rtol=1e-5, atol=1e-5)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _gather(t: torch.Tensor, dist, dim: int = 0) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


@pytest.mark.slow
def test_fp8_linears_with_sequence_parallelism(tmp_path):
    from nemotron_train.platform import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--log-dir", str(tmp_path), "--tee", "3", __file__]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


if __name__ == "__main__":
    _worker()
