"""The scaled_mm FP8 backend: real FP8 GEMMs through torch._scaled_mm, held to its twins.

torch implements `_scaled_mm` on CPU too, so the kernel path itself runs here: against its
pure-torch twin `scaled_mm_ref`, against the emulated backend (the same tensorwise scaling),
and inside the FP8 parallel linears. The CUDA comparison skips without an sm_89+ GPU."""

from pathlib import Path

import pytest
import torch

from nemotron_train.config.loader import load_config
from nemotron_train.errors import ConfigError
from nemotron_train.fp8 import FP8ColumnParallelLinear, FP8Recipe, FP8RowParallelLinear, fp8_autocast, fp8_linear
from nemotron_train.fp8.recipe import E4M3, E5M2, FP8RecipeState
from nemotron_train.fp8.scaled_mm import quantize_to_fp8, scaled_mm, scaled_mm_linear, scaled_mm_ref

IN, OUT = 64, 96


def _operands(dtype=torch.float32, seed=3, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 2, IN, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(OUT, IN, generator=gen) * 0.05).to(device=device, dtype=dtype)
    g = (torch.randn(24, 2, OUT, generator=gen) * 1e-2).to(device=device, dtype=dtype)
    return x, w, g


def _fwd_bwd(fn, x, w, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_kernel_matches_its_reference_twin():
    gen = torch.Generator().manual_seed(0)
    a, sa = quantize_to_fp8(torch.randn(32, 64, generator=gen) * 3, E4M3)
    b, sb = quantize_to_fp8(torch.randn(48, 64, generator=gen), E4M3)
    g, sg = quantize_to_fp8(torch.randn(32, 48, generator=gen) * 1e-3, E5M2)
    # forward form: [32, 64] x [64, 48] (b transposed is column-major)
    torch.testing.assert_close(scaled_mm(a, b.t(), sa, sb, torch.float32),
                               scaled_mm_ref(a, b.t(), sa, sb, torch.float32), rtol=1e-4, atol=2e-5)
    # dgrad form: E5M2 [32, 48] x E4M3 [48, 64] laid out column-major
    torch.testing.assert_close(scaled_mm(g, b.t().contiguous().t(), sg, sb, torch.float32),
                               scaled_mm_ref(g, b, sg, sb, torch.float32), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_scaled_mm_linear_matches_the_emulated_backend(fmt):
    """Same operands on the same FP8 grid; only the accumulation differs (fp32 here)."""
    recipe = FP8Recipe(recipe="tensorwise", format=fmt)
    x, w, g = _operands()
    y, gx, gw = _fwd_bwd(lambda x, w: scaled_mm_linear(x, w, recipe=recipe), x, w, g)
    y_e, gx_e, gw_e = _fwd_bwd(lambda x, w: fp8_linear(x, w, recipe=recipe), x, w, g)
    y_r, gx_r, gw_r = _fwd_bwd(lambda x, w: scaled_mm_linear(x, w, recipe=recipe, gemm="ref"), x, w, g)
    for ours, twin, ref in ((y, y_e, y_r), (gx, gx_e, gx_r), (gw, gw_e, gw_r)):
        torch.testing.assert_close(ours, twin, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    # ... and it is FP8: visibly different from the high-precision product.
    rel = ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item()
    assert 0.005 < rel < 0.06


def test_scaled_mm_refuses_other_recipes():
    with pytest.raises(ValueError, match="tensorwise"):
        scaled_mm_linear(*_operands()[:2], recipe=FP8Recipe(recipe="delayed"))


@pytest.mark.parametrize("kind", ["column", "row"])
def test_parallel_linears_run_scaled_mm_inside_the_fp8_region(mcore, kind):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=4, use_cpu_initialization=True)
    torch.manual_seed(0)
    if kind == "column":
        lin = FP8ColumnParallelLinear(IN, OUT, config=config, init_method=torch.nn.init.normal_, bias=True,
                                      gather_output=False)
    else:
        lin = FP8RowParallelLinear(IN, OUT, config=config, init_method=torch.nn.init.normal_, bias=True,
                                   input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        lin.weight.mul_(0.05)
        lin.bias.normal_()
    x, _, g = _operands()
    recipe = FP8Recipe(recipe="tensorwise")
    xs = x.clone().requires_grad_()
    with fp8_autocast(True, FP8RecipeState(recipe, gemm="scaled_mm")):
        y, _ = lin(xs)
    y.backward(g)
    xr = x.clone().requires_grad_()
    w = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    y_twin = fp8_linear(xr, w, b, recipe=recipe)
    y_twin.backward(g)
    torch.testing.assert_close(y.detach(), y_twin.detach(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lin.bias.grad, b.grad, rtol=1e-6, atol=1e-7)


def _resolve(*overrides, capability=(9, 0)):
    from nemotron_train.platform import Platform
    from nemotron_train.resolve import resolve_run

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"  # FP8-ready GEMM widths
    cfg = load_config(smoke, ["data.source=mock", "model.spec=local", "precision.fp8.enabled=true", "parallel.tp=1",
                              "parallel.sp=false",
                             "precision.fp8.backend=scaled_mm", *overrides])
    platform = Platform("cuda", "nccl") if capability else Platform("cpu", "gloo")
    return resolve_run(cfg, 1, platform, capability=capability, missing_kernels=[], te_version="2.8")


def test_scaled_mm_backend_checks():
    assert _resolve().fp8_backend == "scaled_mm"
    with pytest.raises(ConfigError, match="on CPU use precision.fp8.backend=emulated"):
        _resolve(capability=None)
    with pytest.raises(ConfigError, match="compute capability 8.9"):
        _resolve(capability=(8, 0))
    with pytest.raises(ConfigError, match="tensorwise current scaling only"):
        _resolve("precision.fp8.recipe=delayed")
    with pytest.raises(ConfigError, match="backend=scaled_mm with model.spec=te"):
        _resolve("model.spec=te")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an FP8-capable CUDA GPU (sm_89+); the CPU tests above run the same kernel call")
def test_cuda_scaled_mm_matches_the_emulation_in_bf16():
    recipe = FP8Recipe(recipe="tensorwise")
    x, w, g = _operands(torch.bfloat16, device="cuda")
    x, w, g = x.reshape(-1, IN).repeat(2, 1), w, g.reshape(-1, OUT).repeat(2, 1)  # 96 rows: multiples of 16
    y, gx, gw = _fwd_bwd(lambda x, w: scaled_mm_linear(x, w, recipe=recipe), x, w, g)
    y_e, gx_e, gw_e = _fwd_bwd(lambda x, w: fp8_linear(x, w, recipe=recipe), x, w, g)
    for ours, twin in ((y, y_e), (gx, gx_e), (gw, gw_e)):
        rel = ((ours.float() - twin.float()).norm() / twin.float().norm()).item()
        assert rel < 1e-2, rel
