"""Emulated FP8 numerics: quantisation error per format, FP8 GEMM forward/backward, block
scaling, the autocast context and the per-layer BF16 decision."""

import math

import pytest
import torch

from nemotron_train.fp8 import (
    FP8Recipe,
    active_fp8_state,
    compute_scale,
    fp8_autocast,
    fp8_linear,
    fp8_max,
    is_fp8_enabled,
    layer_runs_in_fp8,
    power_of_two_scale,
    quantize_blockwise,
    quantize_current,
    quantize_scaled,
)
from nemotron_train.fp8.recipe import E4M3, E5M2, FP8RecipeState

# Round-to-nearest with m mantissa bits: relative error <= 2**-(m+1) for normal values.
MAX_REL_ERR = {E4M3: 2.0**-4, E5M2: 2.0**-3}
SMALLEST_NORMAL = {E4M3: 2.0**-6, E5M2: 2.0**-14}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------- quantize_scaled


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_ref_elementwise_error_matches_the_format(dtype, gen):
    x = torch.randn(64, 256, generator=gen)
    scale = compute_scale(x.abs().max(), dtype)
    q = quantize_scaled(x, dtype, scale)
    assert q.dtype == x.dtype and q.shape == x.shape
    normal = (x.abs() * scale) >= SMALLEST_NORMAL[dtype]
    rel = ((q - x).abs() / x.abs())[normal]
    bound = MAX_REL_ERR[dtype]
    assert rel.max().item() <= bound * (1 + 1e-6)
    # FP8 really applied: errors reach a good fraction of the bound, not float32 noise.
    assert rel.max().item() > bound / 2
    # Values on the FP8 grid: re-quantising with the same scale changes nothing.
    assert torch.equal(quantize_scaled(q, dtype, scale), q)


def test_quantize_ref_saturates_and_keeps_dtype():
    x = torch.tensor([1.0, -3.0, 1000.0, -1e6], dtype=torch.bfloat16)
    q = quantize_scaled(x, E4M3, 1.0)
    assert q.dtype == torch.bfloat16
    assert q.tolist() == [1.0, -3.0, 448.0, -448.0]
    # Dequantisation divides by the scale: the grid of x*2 cast then halved.
    assert quantize_scaled(torch.tensor([0.3]), E4M3, 2.0).item() == 0.3125  # 0.6 -> 0.625 (3 mantissa bits)
    assert quantize_scaled(torch.tensor([300.0]), E4M3, 2.0).item() == 224.0  # 600 saturates to 448, / 2


def test_compute_scale_maps_amax_to_fp8_max_with_margin():
    for dtype in (E4M3, E5M2):
        assert (compute_scale(torch.tensor(2.0), dtype) * 2.0).item() == pytest.approx(fp8_max(dtype))
        assert compute_scale(torch.tensor(2.0), dtype, margin=2).item() == pytest.approx(fp8_max(dtype) / 8)
    assert compute_scale(torch.tensor(0.0), E4M3).item() == 1.0


def test_non_finite_inputs_surface_as_nan_not_clamped():
    x = torch.tensor([1.0, float("inf"), 2.0])
    assert torch.isnan(quantize_current(x, E4M3)).all()
    y = torch.tensor([1.0, float("nan"), 2.0])
    out = quantize_current(y, E4M3)
    assert torch.isnan(out[1]) and out[0] == 1.0 and out[2] == 2.0


@pytest.mark.parametrize("dtype,lo,hi", [(E4M3, 0.010, 0.040), (E5M2, 0.025, 0.080)])
def test_current_scaling_frobenius_error(dtype, lo, hi, gen):
    x = torch.randn(128, 512, generator=gen)
    assert lo < _rel(quantize_current(x, dtype), x) < hi


# --------------------------------------------------------------------------- block scaling


def test_power_of_two_scales_are_e8m0_and_fill_the_range():
    amax = torch.tensor([1e-3, 0.7, 1.0, 3.0, 448.0, 5000.0])
    s = power_of_two_scale(amax, E4M3)
    log2 = torch.log2(s)
    assert torch.equal(log2, torch.round(log2))
    assert (amax * s <= 448.0).all() and (amax * s > 224.0).all()
    assert power_of_two_scale(torch.tensor(0.0), E4M3).item() == 1.0


def test_block_scaling_confines_an_outlier_to_its_block(gen):
    x = torch.randn(4, 256, generator=gen) * 1e-3
    x[0, 5] = 1e4  # one outlier in block (row 0, cols 0..31)
    tensorwise = quantize_current(x, E4M3)
    mx = quantize_blockwise(x, E4M3, (1, 32))
    others = torch.ones_like(x, dtype=torch.bool)
    others[0, :32] = False
    # Per-tensor scaling flushes the small values to zero; per-block scaling keeps them.
    assert _rel(tensorwise[others], x[others]) > 0.9
    assert _rel(mx[others], x[others]) < 0.04
    assert mx[0, 5].item() == pytest.approx(1e4, rel=2**-4)


def test_blockwise_2d_blocks_and_padding(gen):
    w = torch.randn(200, 130, generator=gen)  # not multiples of 128: padded internally
    w[150:, 129] = 1e5  # outlier in the bottom-right 128x128 block only
    q = quantize_blockwise(w, E4M3, (128, 128))
    assert q.shape == w.shape
    assert _rel(q[:128, :128], w[:128, :128]) < 0.04
    assert _rel(q[128:, :128], w[128:, :128]) < 0.04  # bottom-left block: its own scale
    tiny = q[128:150, 128:129]  # shares the outlier's block, small values are coarse
    assert _rel(tiny, w[128:150, 128:129]) > 0.04


# --------------------------------------------------------------------------- FP8 GEMM


@pytest.mark.parametrize("recipe", ["tensorwise", "mxfp8", "blockwise"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fp8_gemm_error_against_fp32(recipe, fmt, gen):
    x = torch.randn(2, 96, 256, generator=gen)
    w = torch.randn(128, 256, generator=gen) * 0.02
    b = torch.randn(128, generator=gen)
    g = torch.randn(2, 96, 128, generator=gen) * 1e-3
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = fp8_linear(xr, wr, br, recipe=FP8Recipe(recipe=recipe, format=fmt))
    y.backward(g)
    x0, w0, b0 = (t.clone().requires_grad_() for t in (x, w, b))
    y0 = torch.nn.functional.linear(x0, w0, b0)
    y0.backward(g)
    e_y = _rel(y - br.detach(), y0 - b0.detach())
    e_dx, e_dw = _rel(xr.grad, x0.grad), _rel(wr.grad, w0.grad)
    # Two E4M3 operands: ~sqrt(2) x 0.027. Gradients: E5M2 dy under hybrid.
    assert 0.015 < e_y < 0.06
    lo, hi = (0.035, 0.09) if fmt == "hybrid" else (0.015, 0.06)
    assert lo < e_dx < hi and lo < e_dw < hi
    # db is reduced from the high-precision dy, as TE does.
    torch.testing.assert_close(br.grad, b0.grad)


def test_fp8_gemm_backward_uses_quantized_operands(gen):
    x = torch.randn(64, 128, generator=gen, requires_grad=True)
    w = torch.randn(32, 128, generator=gen, requires_grad=True)
    g = torch.randn(64, 32, generator=gen)
    fp8_linear(x, w, recipe=FP8Recipe(format="hybrid")).backward(g)
    xq, wq, gq = quantize_current(x.detach(), E4M3), quantize_current(w.detach(), E4M3), quantize_current(g, E5M2)
    assert torch.equal(x.grad, gq @ wq)
    assert torch.equal(w.grad, gq.t() @ xq)


def test_fp8_gemm_in_bf16_returns_bf16(gen):
    x = torch.randn(16, 64, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    y = fp8_linear(x, w, recipe=FP8Recipe())
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert 0.01 < _rel(y.float(), x.float() @ w.float().t()) < 0.06


# --------------------------------------------------------------------------- autocast and layers


def test_fp8_autocast_nests_and_restores():
    state = FP8RecipeState(FP8Recipe(recipe="delayed"))
    assert not is_fp8_enabled()
    with fp8_autocast(True, state):
        assert active_fp8_state() is state
        with fp8_autocast(False, state):
            assert not is_fp8_enabled()
        assert is_fp8_enabled()
        with pytest.raises(RuntimeError):
            with fp8_autocast(True):
                assert active_fp8_state().recipe == FP8Recipe()  # schema defaults
                raise RuntimeError("boom")
        assert active_fp8_state() is state
    assert active_fp8_state() is None


def test_recipe_formats():
    assert FP8Recipe(format="hybrid").backward_dtype == E5M2
    assert FP8Recipe(format="e4m3").backward_dtype == E4M3
    assert FP8Recipe(format="hybrid").forward_dtype == E4M3
    with pytest.raises(ValueError):
        FP8Recipe(recipe="nvfp4")


@pytest.mark.parametrize(
    "num_layers,n,expected",
    [
        (6, 0, [True] * 6),
        (6, 1, [False, True, True, True, True, False]),
        (6, 2, [False, False, True, True, False, False]),
        (6, 3, [False] * 6),
        (1, 0, [True]),
    ],
)
def test_layer_runs_in_fp8(num_layers, n, expected):
    assert [layer_runs_in_fp8(i, num_layers, n) for i in range(num_layers)] == expected


def test_layer_runs_in_fp8_rejects_bad_index():
    with pytest.raises(ValueError):
        layer_runs_in_fp8(6, 6, 1)
    with pytest.raises(ValueError):
        layer_runs_in_fp8(-1, 6, 1)


def test_error_bound_constants_are_the_format_epsilons():
    # Guard the test's own assumptions against a torch change in the FP8 dtypes.
    assert MAX_REL_ERR[E4M3] == torch.finfo(E4M3).eps / 2
    assert MAX_REL_ERR[E5M2] == torch.finfo(E5M2).eps / 2
    assert math.isclose(fp8_max(E4M3), 448.0) and math.isclose(fp8_max(E5M2), 57344.0)
