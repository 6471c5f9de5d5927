"""The torch Mamba-2 kernels against their plain `*_ref` twins (float64 unless noted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemotron_train.models import ssd
from nemotron_train.models.ssd import (
    causal_conv1d,
    causal_conv1d_ref,
    gated_rms_norm,
    gated_rms_norm_ref,
    segsum_stable,
    ssd_chunked,
    ssd_chunked_ref,
)

F64 = torch.float64


def make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, *, dt_scale=1.0,
                d_shape="head", init=False, dtype=F64, seed=0):
    """Random SSD inputs; dt = softplus(.) like the mixer's, scaled to widen the decays."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    out = dict(
        x_BLHP=r(batch, seqlen, nheads, headdim),
        dt_BLH=F.softplus(r(batch, seqlen, nheads) - 1.0) * dt_scale,
        A_H=-torch.exp(r(nheads)),
        B_BLGN=r(batch, seqlen, ngroups, dstate),
        C_BLGN=r(batch, seqlen, ngroups, dstate),
        D_H={"head": r(nheads), "headdim": r(nheads, headdim), None: None}[d_shape],
        initial_states=r(batch, nheads, headdim, dstate) if init else None,
    )
    return out


def run_both(inputs, chunk_size, **kw):
    y, final = ssd_chunked(**inputs, chunk_size=chunk_size, return_final_states=True, **kw)
    y_ref, final_ref = ssd_chunked_ref(**inputs, return_final_states=True)
    return (y, final), (y_ref, final_ref)


@pytest.mark.parametrize(
    "batch,seqlen,nheads,headdim,ngroups,dstate,chunk,d_shape,init",
    [
        (2, 64, 4, 8, 1, 16, 16, "head", False),  # seqlen a multiple of the chunk
        (2, 37, 6, 5, 3, 4, 8, "head", True),  # ragged tail, 3 groups of 2 heads
        (1, 50, 8, 4, 2, 6, 16, "headdim", True),  # D per channel, groups of 4
        (3, 9, 2, 3, 2, 5, 32, None, False),  # shorter than one chunk, no D
        (1, 1, 4, 2, 4, 3, 4, "head", True),  # a single token
    ],
)
def test_chunked_matches_recurrence(batch, seqlen, nheads, headdim, ngroups, dstate, chunk,
                                    d_shape, init):
    inputs = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate,
                         d_shape=d_shape, init=init)
    (y, final), (y_ref, final_ref) = run_both(inputs, chunk)
    assert y.shape == (batch, seqlen, nheads, headdim) and y.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_result_independent_of_chunk_size():
    inputs = make_inputs(2, 45, 4, 4, 2, 8, init=True)
    ys = [ssd_chunked(**inputs, chunk_size=q) for q in (1, 4, 7, 16, 64)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-10, atol=1e-10)


@pytest.fixture(params=["factored", "mixed", "all_exact"])
def decay_regime(request, monkeypatch):
    """Which intra-chunk path runs: the factored fast path, the exact per-head path for
    chunks whose decay is too wide to factor, or a mix of both in one call."""
    limit = {"factored": 1e9, "mixed": 2.0, "all_exact": 0.0}[request.param]
    monkeypatch.setitem(ssd._HALF_SPAN, F64, limit)
    return request.param


def _grads(fn, inputs, gy, gfinal):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, final = fn(**{**inputs, **leaves})
    grads = torch.autograd.grad((y * gy).sum() + (final * gfinal).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


@pytest.mark.parametrize("d_shape", ["head", "headdim", None])
def test_gradients_match_recurrence(decay_regime, d_shape):
    inputs = make_inputs(2, 29, 6, 4, 3, 5, d_shape=d_shape, init=True, dt_scale=2.0)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(2, 29, 6, 4, generator=g, dtype=F64)
    gfinal = torch.randn(2, 6, 4, 5, generator=g, dtype=F64)
    chunked = lambda **kw: ssd_chunked(**kw, chunk_size=8, return_final_states=True)  # noqa: E731
    naive = lambda **kw: ssd_chunked_ref(**kw, return_final_states=True)  # noqa: E731
    y, final, grads = _grads(chunked, inputs, gy, gfinal)
    y_ref, final_ref, grads_ref = _grads(naive, inputs, gy, gfinal)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-8, atol=1e-8,
                                   msg=lambda m: f"d/d{name}: {m}")


def test_mixed_regime_really_mixes(monkeypatch):
    """Guard for the fixture above: with its 'mixed' limit both paths do run."""
    monkeypatch.setitem(ssd._HALF_SPAN, F64, 2.0)
    inputs = make_inputs(2, 29, 6, 4, 3, 5, dt_scale=2.0)
    Acs = (inputs["dt_BLH"] * inputs["A_H"])[:, :24].reshape(2, 3, 8, 6).cumsum(2)
    span = Acs.amax(2) - Acs.amin(2)
    assert (span > 4.0).any() and (span <= 4.0).any()


def test_gradcheck_small(decay_regime):
    inputs = make_inputs(1, 7, 4, 2, 2, 3, init=True, dt_scale=3.0)
    names = list(inputs)
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def fn(*args):
        y, final = ssd_chunked(**dict(zip(names, args)), chunk_size=3, return_final_states=True)
        return y, final

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def test_wide_decays_stay_finite_in_float32():
    """Huge dt (decay ~e^-500 within a chunk) must not overflow the factored form."""
    inputs = make_inputs(2, 70, 4, 8, 2, 8, dt_scale=50.0, init=True, dtype=torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = ssd_chunked(**leaves, chunk_size=32)
    y.square().sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    y_ref = ssd_chunked_ref(**{k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_low_precision_inputs_compute_in_float32():
    inputs = make_inputs(2, 40, 4, 8, 2, 8, dtype=torch.float32)
    y32 = ssd_chunked(**inputs, chunk_size=16)
    bf16 = {k: v.to(torch.bfloat16) if k in ("x_BLHP", "B_BLGN", "C_BLGN") else v
            for k, v in inputs.items()}
    y16 = ssd_chunked(**bf16, chunk_size=16)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


def test_seq_major_layout():
    inputs = make_inputs(3, 20, 4, 4, 2, 4)
    y = ssd_chunked(**inputs, chunk_size=8)
    y_seq = ssd_chunked(**inputs, chunk_size=8, seq_major=True)
    assert y_seq.shape == y.shape and y_seq.transpose(0, 1).is_contiguous()
    torch.testing.assert_close(y_seq, y, rtol=0, atol=0)


def test_accepts_strided_inputs():
    """The mixer passes views into its conv output; layout must not matter."""
    inputs = make_inputs(2, 24, 4, 4, 2, 4)
    strided = {k: v.transpose(0, 1).contiguous().transpose(0, 1) if v is not None and v.dim() > 2
               else v for k, v in inputs.items()}
    assert not strided["x_BLHP"].is_contiguous()
    torch.testing.assert_close(ssd_chunked(**strided, chunk_size=8),
                               ssd_chunked(**inputs, chunk_size=8), rtol=0, atol=0)


def test_segsum_stable():
    a = torch.randn(3, 6, dtype=F64)
    seg = segsum_stable(a)
    for i in range(6):
        for j in range(6):
            expected = (a[:, j + 1 : i + 1].sum(-1) if i >= j
                        else torch.full((3,), float("-inf"), dtype=F64))
            torch.testing.assert_close(seg[:, i, j], expected)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d_matches_ref(activation, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True) if with_bias else None
    y = causal_conv1d(x, w, b, activation)
    y_ref = causal_conv1d_ref(x, w, b, activation)
    torch.testing.assert_close(y, y_ref)
    leaves = [t for t in (x, w, b) if t is not None]
    gy = torch.randn_like(y)
    grads, grads_ref = torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
    # Causality: changing the future never changes the past.
    x2 = x.detach().clone()
    x2[..., 7:] += 1.0
    torch.testing.assert_close(causal_conv1d(x2, w, b, activation)[..., :7], y[..., :7])


def test_gated_rms_norm_matches_ref():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, generator=g, dtype=F64)
    z = torch.randn(2, 3, 12, generator=g, dtype=F64)
    w = torch.randn(12, generator=g, dtype=F64)
    for group_size in (None, 4, 6, 12):
        torch.testing.assert_close(gated_rms_norm(x, z, w, group_size, 1e-5),
                                   gated_rms_norm_ref(x, z, w, group_size, 1e-5))
    # Groups normalise independently: scaling one group's input leaves the other alone.
    out = gated_rms_norm_ref(x, z, w, 6, 1e-5)
    x2 = x.clone()
    x2[..., :6] *= 3.0
    torch.testing.assert_close(gated_rms_norm_ref(x2, z, w, 6, 1e-5)[..., 6:], out[..., 6:])
    # Without a gate it is plain grouped RMSNorm.
    rms = x.view(2, 3, 2, 6).square().mean(-1, keepdim=True).add(1e-5).rsqrt()
    plain = (x.view(2, 3, 2, 6) * rms).view(2, 3, 12) * w
    torch.testing.assert_close(gated_rms_norm(x, None, w, 6, 1e-5), plain)


def test_gated_rms_norm_bf16_computes_in_float32():
    x, z, w = torch.randn(4, 16), torch.randn(4, 16), torch.rand(16) + 0.5
    out = gated_rms_norm(x.bfloat16(), z.bfloat16(), w.bfloat16(), 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), gated_rms_norm_ref(x, z, w, 8), rtol=0.02, atol=0.02)


def test_autocast_does_not_lower_the_scan():
    inputs = make_inputs(2, 40, 4, 8, 2, 8, dtype=torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y32 = ssd_chunked(**inputs, chunk_size=16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = ssd_chunked(**{**inputs, **leaves}, chunk_size=16)
    y.sum().backward()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y32, rtol=1e-5, atol=1e-5)
