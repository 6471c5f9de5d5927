"""FP8ColumnParallelLinear / FP8RowParallelLinear against mcore's linears and the FP8 GEMM
twin, on a gloo world of one (tensor-parallel size 1)."""

import pytest
import torch

from nemotron_train.config.schema import Config
from nemotron_train.fp8 import (
    FP8ColumnParallelLinear,
    FP8Recipe,
    FP8RowParallelLinear,
    advance_delayed_scaling,
    fp8_autocast,
    fp8_end_of_step,
    fp8_linear,
    fp8_linears,
    layer_fp8_context,
    quantize_current,
    quantize_scaled,
)
from nemotron_train.fp8.recipe import E4M3, E5M2, FP8RecipeState, active_fp8_state

IN, OUT = 64, 96


def _config(dtype=torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    # CPU initialisation: mcore's GPU-init path allocates on `torch.cuda.current_device()`.
    return TransformerConfig(
        num_layers=1, hidden_size=IN, num_attention_heads=4, use_cpu_initialization=True, params_dtype=dtype
    )


def _pair(kind: str, bias: bool = True, dtype=torch.float32, size=(IN, OUT)):
    """(plain mcore linear, FP8 linear) with identical weights."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    init = torch.nn.init.normal_
    torch.manual_seed(0)
    if kind == "column":
        make = lambda cls: cls(*size, config=_config(dtype), init_method=init, bias=bias, gather_output=False)  # noqa: E731
        plain, fp8 = make(ColumnParallelLinear), make(FP8ColumnParallelLinear)
    else:
        make = lambda cls: cls(  # noqa: E731
            *size, config=_config(dtype), init_method=init, bias=bias, input_is_parallel=True, skip_bias_add=False
        )
        plain, fp8 = make(RowParallelLinear), make(FP8RowParallelLinear)
    with torch.no_grad():
        plain.weight.mul_(0.05)
        if bias:
            plain.bias.normal_()
    fp8.load_state_dict(plain.state_dict())
    return plain, fp8


def _run(module, x, g):
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, _ = module(x)
    out.backward(g)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return out.detach(), grads


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 2, IN, generator=gen).to(dtype)
    g = (torch.randn(12, 2, OUT, generator=gen) * 1e-2).to(dtype)
    return x, g


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outside_fp8_context_identical_to_mcore(mcore, kind, dtype):
    plain, fp8 = _pair(kind, dtype=dtype)
    x, g = _inputs(dtype)
    y0, g0 = _run(plain, x, g)
    y1, g1 = _run(fp8, x, g)
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    # A BF16-kept layer inside an FP8 region is also untouched.
    with fp8_autocast(True, FP8RecipeState(FP8Recipe())):
        with fp8_autocast(False):
            y2, g2 = _run(fp8, x, g)
    assert torch.equal(y0, y2)
    assert all(torch.equal(a, b) for a, b in zip(g0, g2))


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_inside_fp8_context_matches_the_fp8_gemm_twin(mcore, kind, fmt):
    plain, fp8 = _pair(kind)
    x, g = _inputs()
    recipe = FP8Recipe(format=fmt)
    with fp8_autocast(True, FP8RecipeState(recipe)):
        y, grads = _run(fp8, x, g)
    assert active_fp8_state() is None
    xr = x.clone().requires_grad_()
    w = plain.weight.detach().clone().requires_grad_()
    b = plain.bias.detach().clone().requires_grad_()
    y_ref = fp8_linear(xr, w, b, recipe=recipe)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], xr.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[2], b.grad, rtol=1e-6, atol=1e-7)
    # ... and FP8 really changed the numbers relative to the plain linear.
    y0, g0 = _run(plain, x, g)
    rel = ((y - y0).norm() / y0.norm()).item()
    assert 0.005 < rel < 0.06
    assert not torch.equal(grads[1], g0[1])


def test_fp8_grad_output_is_quantized_with_backward_format(mcore):
    _, fp8 = _pair("column", bias=False)
    x, g = _inputs()
    with fp8_autocast(True, FP8RecipeState(FP8Recipe(format="hybrid"))):
        _, grads = _run(fp8, x, g)
    xq = quantize_current(x, E4M3).reshape(-1, IN)
    gq = quantize_current(g, E5M2).reshape(-1, OUT)
    assert torch.equal(grads[1], gq.t() @ xq)


def test_frozen_weight_runs_in_fp8(mcore):
    _, fp8 = _pair("column", bias=False)
    fp8.weight.requires_grad_(False)
    x, g = _inputs()
    x = x.requires_grad_()
    with fp8_autocast(True, FP8RecipeState(FP8Recipe())):
        out, _ = fp8(x)
    out.backward(g)
    wq = quantize_current(fp8.weight, E4M3)
    torch.testing.assert_close(out, quantize_current(x.detach(), E4M3) @ wq.t())
    assert x.grad is not None and fp8.weight.grad is None


# --------------------------------------------------------------------------- delayed scaling


def test_delayed_scaling_in_a_linear(mcore):
    _, fp8 = _pair("column", bias=False)
    recipe = FP8Recipe(recipe="delayed", amax_history_len=4, amax_compute_algo="max")
    state = FP8RecipeState(recipe)
    x, g = _inputs()
    assert fp8.delayed_scaling_state() is None
    # Step 0: no scale yet -> current scaling; the amaxes are recorded in row 0.
    with fp8_autocast(True, state):
        y0, _ = _run(fp8, x, g)
    history, scale = fp8.delayed_scaling_state()
    torch.testing.assert_close(y0, quantize_current(x, E4M3) @ quantize_current(fp8.weight.detach(), E4M3).t())
    expected = torch.stack([x.abs().max(), fp8.weight.detach().abs().max(), g.abs().max()])
    torch.testing.assert_close(history[0], expected)
    assert torch.equal(scale, torch.zeros(3))
    assert advance_delayed_scaling(fp8, recipe) == 1
    torch.testing.assert_close(scale, torch.tensor([448.0, 448.0, 57344.0]) / expected)
    assert torch.equal(history[0], torch.zeros(3)) and torch.equal(history[-1], expected)
    # Step 1 uses the step-0 scale, even for an input 10x larger (it saturates).
    with fp8_autocast(True, state):
        y1, _ = _run(fp8, 10 * x, g)
    w_q = quantize_scaled(fp8.weight.detach(), E4M3, scale[1])
    torch.testing.assert_close(y1, quantize_scaled(10 * x, E4M3, scale[0]) @ w_q.t())
    assert not torch.allclose(y1, 10 * y0, rtol=0.05)
    assert history[0, 0].item() == pytest.approx(10 * expected[0].item())


def test_delayed_scaling_not_recorded_in_eval(mcore):
    _, fp8 = _pair("row", bias=False)
    state = FP8RecipeState(FP8Recipe(recipe="delayed", amax_history_len=2))
    x, _ = _inputs()
    fp8.eval()
    with torch.no_grad(), fp8_autocast(True, state):
        fp8(x)
    history, _ = fp8.delayed_scaling_state()
    assert torch.equal(history, torch.zeros(2, 3))


def test_delayed_buffers_are_not_checkpointed(mcore):
    plain, fp8 = _pair("column")
    x, g = _inputs()
    with fp8_autocast(True, FP8RecipeState(FP8Recipe(recipe="delayed", amax_history_len=8))):
        _run(fp8, x, g)
    names = dict(fp8.named_buffers())
    assert set(names) == {"fp8_amax_history", "fp8_scale"}
    assert set(fp8.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(fp8.state_dict())  # interchangeable in both directions
    fp8.load_state_dict(plain.state_dict())


def test_layer_contexts_and_end_of_step_from_config(mcore):
    cfg = Config()
    cfg.model.num_layers = 4
    fp8 = cfg.precision.fp8
    fp8.enabled, fp8.recipe, fp8.first_last_layers_bf16, fp8.amax_history_len = True, "delayed", 1, 3
    ctx_for = layer_fp8_context(cfg, "emulated")
    seen = []
    for i in range(4):
        with ctx_for(i):
            state = active_fp8_state()
            seen.append(state is not None)
    assert seen == [False, True, True, False]
    with ctx_for(1):
        assert active_fp8_state().recipe == FP8Recipe(recipe="delayed", amax_history_len=3)

    model = torch.nn.ModuleList([_pair("column", bias=False)[1], _pair("row", bias=False, size=(OUT, IN))[1]])
    x, g = _inputs()
    with ctx_for(1):
        out, _ = model[0](x)
        model[1](out)[0].backward(torch.ones(12, 2, IN))
    assert [n for n, _ in fp8_linears(model)] == ["0", "1"]
    assert fp8_end_of_step(model, cfg, "emulated") == 2
    assert all(m.fp8_scale.gt(0).all() for m in model)
    assert fp8_end_of_step(model, cfg, "te") == 0  # TE keeps its own histories
    cfg.precision.fp8.enabled = False
    with layer_fp8_context(cfg, "emulated")(1):
        assert active_fp8_state() is None
