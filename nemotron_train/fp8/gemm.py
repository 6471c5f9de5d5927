"""Emulated FP8 GEMM: the pure-torch twin of TransformerEngine's FP8 linear.

Forward:  y    = Q_fwd(x) @ Q_fwd(w)^T (+ b)
Backward: dx   = Q_bwd(dy) @ Q_fwd(w)
          dw   = Q_bwd(dy)^T @ Q_fwd(x)
          db   = sum(dy)              (high precision, as TE's fused cast+bgrad does)

Q_fwd is E4M3; Q_bwd is E5M2 under the `hybrid` format and E4M3 under `e4m3`. The saved
operands are the quantised x and w, so both backward GEMMs consume FP8 values.

Two forms share the quantisers:
- `fp8_linear` / `FP8GemmFunction`: a self-contained autograd Function;
- `fake_quantize_ste` + `quantize_grad_output`: straight-through wrappers that let an
  unmodified GEMM (mcore's, with its tensor/sequence-parallel communication) run on FP8
  operands; see linear.py. Tests check that the two agree.

Block-scaled recipes quantise every operand once, in blocks along its last dimension, and
the backward GEMMs reuse the forward-quantised x and w. TE instead re-quantises x and w
(and dy for wgrad) along the backward contraction dimension; the per-element error is of
the same size, but the values differ, so block-scaled emulation is an approximation.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from nemotron_train.fp8.quantize import quantize_blockwise, quantize_current, quantize_scaled, reduce_amax, tensor_amax
from nemotron_train.fp8.recipe import BLOCK_SHAPES, FP8Recipe
from nemotron_train.fp8.scaling import SLOTS, delayed_scale, record_amax


class TensorQuantizer:
    """Fake-quantises one GEMM operand role ("input", "weight" or "grad_output").

    For delayed scaling it reads the scale from, and records amaxes into, the owning
    module's (history, scale) buffers; `record=False` leaves the history untouched
    (evaluation)."""

    def __init__(
        self,
        recipe: FP8Recipe,
        role: str,
        delayed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        record: bool = True,
        amax_group: Optional[Any] = None,
    ) -> None:
        if recipe.is_delayed and delayed is None:
            raise ValueError("delayed scaling needs the owning module's (history, scale) buffers")
        self.recipe = recipe
        self.role = role
        self.dtype = recipe.dtype_for(role)
        self.delayed = delayed
        self.record = record
        self.amax_group = amax_group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        recipe = self.recipe
        if recipe.is_block_scaled:
            return quantize_blockwise(x, self.dtype, BLOCK_SHAPES[recipe.recipe][self.role])
        if not recipe.is_delayed:
            return quantize_current(x, self.dtype, recipe.margin, self.amax_group)
        history, scale = self.delayed
        slot = SLOTS[self.role]
        amax = reduce_amax(tensor_amax(x), self.amax_group)
        if self.record:
            record_amax(history, slot, amax)
        return quantize_scaled(x, self.dtype, delayed_scale(scale, slot, amax, self.dtype, recipe.margin))


def make_quantizers(
    recipe: FP8Recipe,
    delayed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    record: bool = True,
    input_amax_group: Optional[Any] = None,
) -> Tuple[TensorQuantizer, TensorQuantizer, TensorQuantizer]:
    """(input, weight, grad_output) quantisers for one GEMM."""
    return (
        TensorQuantizer(recipe, "input", delayed, record, input_amax_group),
        TensorQuantizer(recipe, "weight", delayed, record),
        TensorQuantizer(recipe, "grad_output", delayed, record),
    )


class FP8GemmFunction(torch.autograd.Function):
    """y = Q(x) @ Q(w)^T + b with FP8-quantised backward; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, quantize_x, quantize_w, quantize_g):  # type: ignore[override]
        x_q = quantize_x(x)
        w_q = quantize_w(weight)
        ctx.save_for_backward(x_q, w_q)
        ctx.quantize_g = quantize_g
        ctx.has_bias = bias is not None
        out = torch.matmul(x_q, w_q.t())
        if bias is not None:
            out = out + bias
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x_q, w_q = ctx.saved_tensors
        g_q = ctx.quantize_g(grad_output)
        grad_x = g_q.matmul(w_q) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # Same operand order as mcore's wgrad so the two paths agree bit for bit.
            grad_w = g_q.reshape(-1, g_q.shape[-1]).t().matmul(x_q.reshape(-1, x_q.shape[-1]))
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.reshape(-1, grad_output.shape[-1]).sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    recipe: FP8Recipe,
    delayed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    record: bool = True,
) -> torch.Tensor:
    """Emulated FP8 `F.linear(x, weight, bias)` with FP8 backward GEMMs."""
    qx, qw, qg = make_quantizers(recipe, delayed, record)
    return FP8GemmFunction.apply(x, weight, bias, qx, qw, qg)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: quantise. Backward: pass the gradient straight through."""

    @staticmethod
    def forward(ctx, x, quantizer):  # type: ignore[override]
        return quantizer(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _QuantizeGradOutput(torch.autograd.Function):
    """Forward: identity. Backward: quantise the incoming gradient (the GEMM's dy)."""

    @staticmethod
    def forward(ctx, y, quantizer):  # type: ignore[override]
        ctx.quantizer = quantizer
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.quantizer(grad), None


def fake_quantize_ste(x: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
    return _FakeQuantSTE.apply(x, quantizer)


def quantize_grad_output(y: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
    return _QuantizeGradOutput.apply(y, quantizer)
