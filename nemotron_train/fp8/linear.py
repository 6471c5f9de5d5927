"""FP8-emulating drop-ins for mcore's ColumnParallelLinear / RowParallelLinear (local spec).

Outside an enabled `fp8_autocast` they are mcore's classes, bit for bit: `_forward_impl`
defers to the parent. Inside one, the GEMM that mcore's `_forward_impl` runs gets FP8
operands:

    x_q = STE(Q_fwd(x)),  w_q = STE(Q_fwd(w))          (straight-through in backward)
    y   = mcore._forward_impl(x_q, w_q, bias=None)      (its TP/SP communication unchanged)
    y   = GradQuant(y) [+ bias]                         (dy is quantised with Q_bwd)

mcore saves x_q and w_q for its backward, so dgrad = Q(dy) @ w_q and wgrad = Q(dy)^T @ x_q
are computed from quantised operands. With sequence parallelism mcore all-gathers x_q
inside `_forward_impl`; gathering is exact, and the input amax is max-reduced over the TP
group first so every shard is quantised with the same scale. The bias is added after the
gradient quantiser so its gradient stays in high precision, as in TE.

Delayed-scaling state (`fp8_amax_history`, `fp8_scale`) is held in non-persistent buffers,
created on the first FP8 forward: they move with `.to()` but are not in `state_dict()`, so
checkpoints are identical with and without FP8 and any checkpoint loads into either. After a
resume the history starts empty and the first step uses current scaling (scaling.py).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from nemotron_train.fp8.gemm import fake_quantize_ste, make_quantizers, quantize_grad_output
from nemotron_train.fp8.recipe import FP8Recipe, FP8RecipeState, active_fp8_state
from nemotron_train.fp8.scaling import new_delayed_buffers, step_delayed_scaling


class _FP8LinearMixin:
    """Shared FP8 routing for both parallel linears; must precede the mcore base class."""

    def _init_fp8_state(self) -> None:
        # Registered as None so they appear in named_buffers only once FP8 has run.
        self.register_buffer("fp8_amax_history", None, persistent=False)
        self.register_buffer("fp8_scale", None, persistent=False)

    def _forward_impl(self, input, weight, *args, **kwargs):  # noqa: A002 (mcore's name)
        state = active_fp8_state()
        if state is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        if args:
            # mcore passes everything by keyword, and the two GEMM helpers it may dispatch to
            # order their positional parameters differently, so positions can't be mapped.
            raise TypeError(f"{type(self).__name__}._forward_impl expects keyword arguments in FP8 mode")
        return self._fp8_forward_impl(state, input, weight, dict(kwargs))

    def _fp8_forward_impl(self, state: FP8RecipeState, x: torch.Tensor, weight: torch.Tensor, kwargs: Dict[str, Any]):
        recipe = state.recipe
        if state.gemm == "scaled_mm":
            return self._scaled_mm_forward_impl(recipe, x, weight, kwargs)
        record = self.training and torch.is_grad_enabled()
        delayed = self._delayed_buffers(recipe, weight.device) if recipe.is_delayed else None
        qx, qw, qg = make_quantizers(recipe, delayed, record, self._input_amax_group(kwargs))
        bias = kwargs.pop("bias", None)
        # The quantised weight is not the Parameter that owns main_grad; let autograd put
        # the gradient on the Parameter (mcore's DDP hooks accumulate it from .grad).
        kwargs["gradient_accumulation_fusion"] = False
        out = super()._forward_impl(
            input=fake_quantize_ste(x, qx), weight=fake_quantize_ste(weight, qw), bias=None, **kwargs
        )
        out = quantize_grad_output(out, qg)
        return out + bias if bias is not None else out

    def _scaled_mm_forward_impl(self, recipe: FP8Recipe, x: torch.Tensor, weight: torch.Tensor, kwargs: Dict[str, Any]):
        """Real FP8 GEMMs (`torch._scaled_mm`) with the communication mcore's `_forward_impl`
        would have done around its GEMM: a column-parallel input is all-gathered (sequence
        parallel; backward reduce-scatters) or copied (backward all-reduces dgrad). The
        gathered input is quantised whole, so every TP rank uses one scale."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        from nemotron_train.fp8.scaled_mm import scaled_mm_linear

        group = kwargs.get("tp_group") or self.tp_group
        if kwargs.get("sequence_parallel"):
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
        elif kwargs.get("allreduce_dgrad"):
            x = copy_to_tensor_model_parallel_region(x, group=group)
        return scaled_mm_linear(x, weight, kwargs.get("bias"), recipe=recipe)

    def _input_amax_group(self, kwargs: Dict[str, Any]) -> Optional[Any]:
        if not kwargs.get("sequence_parallel"):
            return None
        group = kwargs.get("tp_group") or self.tp_group
        return group if group is not None and group.size() > 1 else None

    def _delayed_buffers(self, recipe: FP8Recipe, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        history = self.fp8_amax_history
        if history is None or history.shape[0] != recipe.amax_history_len or history.device != device:
            self.fp8_amax_history, self.fp8_scale = new_delayed_buffers(recipe.amax_history_len, device)
        return self.fp8_amax_history, self.fp8_scale

    def delayed_scaling_state(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(history, scale) once delayed scaling has run in this module, else None."""
        if self.fp8_amax_history is None:
            return None
        return self.fp8_amax_history, self.fp8_scale


class FP8ColumnParallelLinear(_FP8LinearMixin, ColumnParallelLinear):
    """mcore ColumnParallelLinear whose GEMM runs in emulated FP8 inside `fp8_autocast`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fp8_state()


class FP8RowParallelLinear(_FP8LinearMixin, RowParallelLinear):
    """mcore RowParallelLinear whose GEMM runs in emulated FP8 inside `fp8_autocast`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fp8_state()


def fp8_linears(model: Any) -> Iterator[Tuple[str, _FP8LinearMixin]]:
    """(name, module) of every FP8 linear in a module or a list of model chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for i, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if isinstance(module, _FP8LinearMixin):
                yield (f"{i}.{name}" if len(chunks) > 1 else name), module


def advance_delayed_scaling(model: Any, recipe: FP8Recipe, amax_group: Optional[Any] = None) -> int:
    """End one training step of delayed scaling for every FP8 linear of `model`.

    Call once per optimizer step, after the last backward of the step, on every rank of
    `amax_group` (it runs one collective there). Modules that never ran FP8 are skipped.
    A no-op for other recipes. Returns how many modules were updated."""
    if not recipe.is_delayed:
        return 0
    states = [s for _, m in fp8_linears(model) if (s := m.delayed_scaling_state()) is not None]
    return step_delayed_scaling(states, recipe, amax_group)
