"""TransformerEngine FP8 linear vs the pure-torch emulation (GPU with TE only; skipped here).

Both carry FP8 quantisation error against a high-precision reference; if they implement the
same recipe they agree with each other far more closely than either agrees with it."""

import pytest
import torch

from nemotron_train.fp8 import FP8Recipe, fp8_linear

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs an FP8-capable CUDA GPU (compute capability 8.9+)", allow_module_level=True)
try:
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe
except Exception:  # noqa: BLE001 - a broken TE install is as good as none here
    pytest.skip("needs transformer_engine", allow_module_level=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _te_and_emulated(recipe_obj, recipe: FP8Recipe, backward: bool = True):
    torch.manual_seed(0)
    lin = te.Linear(256, 128, bias=False, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16) * 1e-2
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe_obj):
        y_te = lin(x)
    x2 = x.detach().clone().requires_grad_()
    w2 = lin.weight.detach().clone().requires_grad_()
    y_em = fp8_linear(x2, w2, recipe=recipe)
    xf, wf, gf = x.detach().float(), lin.weight.detach().float(), g.float()
    pairs = [(y_te, y_em, xf @ wf.t())]
    if backward:
        y_te.backward(g)
        y_em.backward(g)
        pairs += [(x.grad, x2.grad, gf @ wf), (lin.weight.grad, w2.grad, gf.t() @ xf)]
    return pairs


def _assert_agree(pairs):
    for got_te, got_em, ref in pairs:
        err_te, err_em, diff = _rel(got_te, ref), _rel(got_em, ref), _rel(got_te, got_em)
        assert 0.005 < err_te < 0.1 and 0.005 < err_em < 0.1, (err_te, err_em)
        assert diff < 0.35 * err_te, (diff, err_te)


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_current_scaling_matches_emulation(fmt):
    te_fmt = te_recipe.Format.HYBRID if fmt == "hybrid" else te_recipe.Format.E4M3
    _assert_agree(_te_and_emulated(te_recipe.Float8CurrentScaling(fp8_format=te_fmt), FP8Recipe("tensorwise", fmt)))


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] != 10, reason="MXFP8 needs sm_100/sm_103")
def test_mxfp8_forward_matches_emulation():
    # Forward only: the emulation reuses forward-quantised operands in backward (see gemm.py).
    recipe_obj = te_recipe.MXFP8BlockScaling(fp8_format=te_recipe.Format.E4M3)
    _assert_agree(_te_and_emulated(recipe_obj, FP8Recipe("mxfp8", "e4m3"), backward=False))
