"""Delayed scaling: per-tensor amax histories and the scales derived from them.

Layout and update rule are TransformerEngine's (`DelayedScaling`):

- Each FP8 linear keeps `history` of shape [amax_history_len, 3] (columns: input, weight,
  grad_output) and `scale` of shape [3], float32.
- Row 0 is the slot of the step in progress. Every quantisation of a tensor during the
  step (all micro-batches, activation recomputation) max-accumulates its amax there.
- At the end of the step (`update_history_and_scale`, called by the trainer through
  `advance_delayed_scaling` after the optimizer step):
    1. the row-0 amaxes are max-reduced over the amax group (data x tensor x context
       parallel ranks) so every rank computes the same scales;
    2. amax = max over all rows (`max`) or row 0 (`most_recent`);
    3. scale = fp8_max / amax / 2**margin where that amax is finite and > 0, else the
       previous scale is kept;
    4. the history is rolled by -1 along dim 0 and row 0 is zeroed.
  After step t ends, the window used at step t+1 is the amaxes of steps t-L+1 .. t, so the
  scale used during step t comes only from steps before t.
- Before any step has ended, `scale` is 0 ("unset"), and quantisation falls back to
  current scaling (the tensor's own amax). TE instead starts from scale 1, which
  underflows small gradients in the first step; the fallback also makes a resumed run
  (histories are not checkpointed) start sanely.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch

from nemotron_train.fp8.quantize import compute_scale
from nemotron_train.fp8.recipe import ROLES, FP8Recipe, fp8_max

SLOTS = {role: i for i, role in enumerate(ROLES)}


def new_delayed_buffers(history_len: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (history [history_len, 3], scale [3]) float32 tensors; scale 0 means unset."""
    history = torch.zeros(history_len, len(ROLES), dtype=torch.float32, device=device)
    scale = torch.zeros(len(ROLES), dtype=torch.float32, device=device)
    return history, scale


def record_amax(history: torch.Tensor, slot: int, amax: torch.Tensor) -> None:
    """Max-accumulate this quantisation's amax into the current step's row."""
    with torch.no_grad():
        history[0, slot] = torch.maximum(history[0, slot], amax.to(history.dtype))


def delayed_scale(
    scale: torch.Tensor, slot: int, current_amax: torch.Tensor, fp8_dtype: torch.dtype, margin: int
) -> torch.Tensor:
    """The stored scale, or the current-scaling one while the stored scale is unset (0)."""
    stored = scale[slot]
    return torch.where(stored > 0, stored, compute_scale(current_amax, fp8_dtype, margin))


def slot_fp8_maxes(recipe: FP8Recipe, device: torch.device) -> torch.Tensor:
    return torch.tensor([fp8_max(recipe.dtype_for(role)) for role in ROLES], dtype=torch.float32, device=device)


def update_history_and_scale(history: torch.Tensor, scale: torch.Tensor, recipe: FP8Recipe) -> None:
    """Steps 2-4 of the module docstring, in place (the reduction is done by the caller)."""
    with torch.no_grad():
        if recipe.amax_compute_algo == "max":
            amax = history.amax(dim=0)
        else:
            amax = history[0].clone()
        new_scale = slot_fp8_maxes(recipe, history.device) / amax / (2.0**recipe.margin)
        valid = (amax > 0) & torch.isfinite(amax)
        scale.copy_(torch.where(valid, new_scale, scale))
        if history.shape[0] > 1:
            history.copy_(torch.roll(history, -1, dims=0))
        history[0].zero_()


def reduce_current_amaxes(histories: List[torch.Tensor], group: Optional[object]) -> None:
    """Max-reduce every history's row 0 over `group` with a single collective."""
    if not histories or group is None:
        return
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return
    flat = torch.cat([h[0] for h in histories])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for h, chunk in zip(histories, flat.split(len(ROLES))):
        h[0].copy_(chunk)


def step_delayed_scaling(
    states: Iterable[Tuple[torch.Tensor, torch.Tensor]], recipe: FP8Recipe, group: Optional[object] = None
) -> int:
    """End-of-step update for (history, scale) pairs; returns how many were updated."""
    states = list(states)
    reduce_current_amaxes([h for h, _ in states], group)
    for history, scale in states:
        update_history_and_scale(history, scale, recipe)
    return len(states)
