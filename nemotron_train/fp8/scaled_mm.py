"""Real FP8 GEMMs without TransformerEngine: `torch._scaled_mm` with tensorwise current scaling.

Forward:  y  = (Q(x) @ Q(w)^T) * sx^-1 * sw^-1         Q: E4M3, scale from each tensor's amax
Backward: dx = (Q'(dy) @ Q(w)) * sdy^-1 * sw^-1       Q': E5M2 (hybrid) or E4M3
          dw = (Q'(dy)^T @ Q(x)) * sdy^-1 * sx^-1

The scales are those of the emulated backend (`quantize.compute_scale`, TE's convention), so
`emulated` with recipe `tensorwise` is this path's pure-torch twin: both quantise the same
operands to the same FP8 values and differ only in where the products are accumulated.
The GEMM itself is `scaled_mm` (the kernel) or `scaled_mm_ref` (dequantise, then matmul),
chosen per call; tests run both on CPU, where torch also implements `_scaled_mm`.

`_scaled_mm` wants its first operand row-major and its second column-major; on CUDA every
dimension must be a multiple of 16 (the model's GEMM widths per TP rank are).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from nemotron_train.fp8.quantize import compute_scale, reduce_amax, tensor_amax
from nemotron_train.fp8.recipe import E4M3, FP8Recipe, fp8_max

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) on FP8 operands: a [M, K] row-major, b [K, N] column-major."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def scaled_mm_ref(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch twin of `scaled_mm`: dequantise in float32, matmul, cast."""
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


GEMMS: Dict[str, Gemm] = {"scaled_mm": scaled_mm, "ref": scaled_mm_ref}


def quantize_to_fp8(x: torch.Tensor, fp8_dtype: torch.dtype, margin: int = 0,
                    amax_group: Optional[Any] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x in FP8, dequantisation scale 1/scale) with the tensor's own (group-reduced) amax."""
    scale = compute_scale(reduce_amax(tensor_amax(x), amax_group), fp8_dtype, margin).to(x.device)
    limit = fp8_max(fp8_dtype)
    q = (x.float() * scale).clamp(-limit, limit).to(fp8_dtype)
    return q, (1.0 / scale).float()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (what `_scaled_mm` wants for its second operand)."""
    return t.t().contiguous().t()


class ScaledMMLinear(torch.autograd.Function):
    """y = x @ w^T with all three GEMMs in FP8 (no bias: callers add it in high precision)."""

    @staticmethod
    def forward(ctx, x, weight, recipe: FP8Recipe, gemm_name: str, amax_group):  # type: ignore[override]
        gemm = GEMMS[gemm_name]
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        xq, sx = quantize_to_fp8(x2, recipe.forward_dtype, recipe.margin, amax_group)
        wq, sw = quantize_to_fp8(weight, recipe.forward_dtype, recipe.margin)
        out = gemm(xq, wq.t(), sx, sw, x.dtype)  # wq.t() of a row-major [N, K] is column-major
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.recipe, ctx.gemm_name, ctx.x_shape, ctx.out_dtype = recipe, gemm_name, x.shape, x.dtype
        ctx.weight_dtype = weight.dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        xq, sx, wq, sw = ctx.saved_tensors
        gemm = GEMMS[ctx.gemm_name]
        g2 = grad_output.reshape(-1, grad_output.shape[-1])
        gq, sg = quantize_to_fp8(g2, ctx.recipe.backward_dtype, ctx.recipe.margin)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm(gq, _col_major(wq), sg, sw, ctx.out_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = gemm(gq.t().contiguous(), _col_major(xq), sg, sx, ctx.weight_dtype)
        return grad_x, grad_w, None, None, None


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     recipe: FP8Recipe, gemm: str = "scaled_mm", amax_group: Optional[Any] = None) -> torch.Tensor:
    """FP8 `F.linear(x, weight, bias)`; `gemm="ref"` runs the pure-torch twin of the kernel."""
    if recipe.recipe != "tensorwise" or recipe.forward_dtype != E4M3:
        raise ValueError(f"scaled_mm implements tensorwise current scaling only, got recipe {recipe.recipe!r}")
    out = ScaledMMLinear.apply(x, weight, recipe, gemm, amax_group)
    return out + bias if bias is not None else out
