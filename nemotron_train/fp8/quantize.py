"""Pure-torch FP8 quantisation: the numerics of the emulated backend.

Everything here returns *dequantised* tensors in the input's dtype whose values lie on the
FP8 grid (fake quantisation): `x -> cast_fp8(clamp(x * scale)) / scale`. A GEMM on such
operands equals, up to accumulation order, an FP8 tensor-core GEMM with FP32 accumulation
whose result is multiplied by both operands' inverse scales, which is what TE computes.

Scales follow TE's convention: `scale` multiplies the high-precision tensor into FP8 range
and `1 / scale` ("scale_inv") dequantises.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from nemotron_train.fp8.recipe import fp8_max

ScaleLike = Union[float, torch.Tensor]

# E8M0 (MXFP8) scales are powers of two with an 8-bit exponent.
_MIN_EXP2, _MAX_EXP2 = -127, 127


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d float32 tensor (no host sync); NaN if x holds a NaN."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


def compute_scale(amax: ScaleLike, fp8_dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """Per-tensor scale `fp8_max / amax / 2**margin`, so the largest value maps to fp8_max.

    amax == 0 (an all-zero tensor) gives scale 1. A NaN amax also gives 1 so the NaNs pass
    through to the output, and an infinite amax gives scale 0, which turns the output into
    NaN: a non-finite input must surface as a non-finite loss, not be clamped away."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    scale = fp8_max(fp8_dtype) / amax / (2.0**margin)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_scaled(x: torch.Tensor, fp8_dtype: torch.dtype, scale: ScaleLike) -> torch.Tensor:
    """Round-trip x through FP8: `cast_fp8(clamp(x * scale, +-fp8_max)) / scale`, in x.dtype.

    `scale` may be a number, a 0-d tensor or any tensor broadcastable to x (block scales).
    Values beyond the range saturate to +-fp8_max, as TE's casts do; the arithmetic is in
    float32 so the only rounding besides the FP8 cast is the final cast to x.dtype."""
    limit = fp8_max(fp8_dtype)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    q = (x.float() * scale).clamp(-limit, limit).to(fp8_dtype)
    return (q.float() / scale).to(x.dtype)


def quantize_current(
    x: torch.Tensor, fp8_dtype: torch.dtype, margin: int = 0, amax_group: Optional[object] = None
) -> torch.Tensor:
    """Tensorwise current scaling: the scale comes from this tensor's own amax.

    With `amax_group` the amax is first max-reduced over that group, so shards of one
    logical tensor (sequence-parallel activations, which are all-gathered afterwards) share
    one scale."""
    amax = reduce_amax(tensor_amax(x), amax_group)
    return quantize_scaled(x, fp8_dtype, compute_scale(amax, fp8_dtype, margin))


def reduce_amax(amax: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """All-reduce MAX over `group` (a no-op without one or for a group of one)."""
    if group is None:
        return amax
    import torch.distributed as dist

    if dist.get_world_size(group) <= 1:
        return amax
    amax = amax.clone()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def power_of_two_scale(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Largest power of two s with amax * s <= fp8_max (E8M0-representable).

    This is the MXFP8 rule (TE rounds the inverse scale amax / fp8_max *up* to a power of
    two) and the default of TE's Float8BlockScaling. amax == 0 gives 1; amax == inf gives
    0, i.e. NaN output for that block."""
    ratio = fp8_max(fp8_dtype) / amax.float()
    ratio = torch.where(amax > 0, ratio, torch.ones_like(ratio))
    exponent = torch.floor(torch.log2(ratio)).clamp(_MIN_EXP2, _MAX_EXP2)
    scale = torch.exp2(exponent)
    return torch.where(torch.isinf(amax), torch.zeros_like(scale), scale)


def quantize_blockwise(x: torch.Tensor, fp8_dtype: torch.dtype, block: Tuple[int, int]) -> torch.Tensor:
    """Fake-quantise with one power-of-two scale per (rows x cols) block of the 2-D view.

    The view is `x.reshape(-1, x.shape[-1])`: rows are tokens (or output features for a
    weight) and the last dimension is the GEMM contraction dimension. Shapes that are not
    multiples of the block are zero-padded; padding cannot raise a block's amax."""
    rows, cols = block
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float() if x.dim() != 2 else x.float()
    m, k = x2.shape
    pad_m, pad_k = (-m) % rows, (-k) % cols
    if pad_m or pad_k:
        x2 = F.pad(x2, (0, pad_k, 0, pad_m))
    mp, kp = x2.shape
    blocks = x2.reshape(mp // rows, rows, kp // cols, cols)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    deq = quantize_scaled(blocks, fp8_dtype, power_of_two_scale(amax, fp8_dtype))
    return deq.reshape(mp, kp)[:m, :k].reshape(shape).to(x.dtype)
