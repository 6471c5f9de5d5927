"""Our pure-torch Mamba-2 kernels against the mamba-ssm / causal-conv1d CUDA kernels they
stand in for (GPU with those packages only; skipped elsewhere, where tests/test_ssd.py holds
the kernels to their `*_ref` twins). Run by bench/gpu/validate.sh when the packages build."""

import pytest
import torch

from nemotron_train.models.ssd import causal_conv1d, ssd_chunked

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _inputs(dtype, b=2, l=256, h=8, p=64, g=2, n=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, l, h, p, device="cuda", generator=gen).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device="cuda", generator=gen) - 1.0)
    A = -torch.rand(h, device="cuda", generator=gen) * 4 - 0.5
    B = torch.randn(b, l, g, n, device="cuda", generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, device="cuda", generator=gen).to(dtype)
    D = torch.randn(h, device="cuda", generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_chunked_matches_mamba_chunk_scan_combined(dtype):
    ssd = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined", reason="needs mamba-ssm")
    x, dt, A, B, C, D = _inputs(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, dt, B, C)]
    y_ours = ssd_chunked(leaves[0], leaves[1], A, leaves[2], leaves[3], chunk_size=64, D_H=D)
    theirs = [t.detach().clone().requires_grad_() for t in (x, dt, B, C)]
    y_ref = ssd.mamba_chunk_scan_combined(theirs[0], theirs[1], A, theirs[2], theirs[3], chunk_size=64, D=D)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=tol, atol=tol)
    g = torch.randn_like(y_ref)
    y_ours.backward(g)
    y_ref.backward(g)
    for ours, ref in zip(leaves, theirs):
        rel = ((ours.grad.float() - ref.grad.float()).norm() / ref.grad.float().norm()).item()
        assert rel < (1e-3 if dtype == torch.float32 else 2e-2), rel


def test_causal_conv1d_matches_the_cuda_kernel():
    cc = pytest.importorskip("causal_conv1d", reason="needs causal-conv1d")
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 128, 300, device="cuda", generator=gen)
    w = torch.randn(128, 4, device="cuda", generator=gen)
    b = torch.randn(128, device="cuda", generator=gen)
    torch.testing.assert_close(causal_conv1d(x, w, b, activation="silu"),
                               cc.causal_conv1d_fn(x, w, b, activation="silu"), rtol=1e-4, atol=1e-4)
