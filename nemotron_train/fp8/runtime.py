"""What the model stack and the trainer call: per-layer FP8 contexts and the step hook.

    ctx_for = layer_fp8_context(cfg, backend)          # once, at model build
    with ctx_for(global_layer_index): layer(...)        # every layer forward
    fp8_end_of_step(model, cfg, backend)                # once per optimizer step

The per-layer decision is `layer_runs_in_fp8`: the first and last
`precision.fp8.first_last_layers_bf16` hybrid layers (by global index, so independent of
the pipeline split) run in BF16, as in Nemotron-H.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

from nemotron_train.config.schema import Config
from nemotron_train.fp8.linear import advance_delayed_scaling
from nemotron_train.fp8.recipe import FP8Recipe, FP8RecipeState, fp8_autocast


def layer_runs_in_fp8(layer_index: int, num_layers: int, first_last_layers_bf16: int) -> bool:
    """Whether hybrid layer `layer_index` (0-based, global) runs in FP8."""
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index={layer_index} is outside 0..{num_layers - 1}")
    if first_last_layers_bf16 < 0:
        raise ValueError(f"first_last_layers_bf16={first_last_layers_bf16} must be >= 0")
    n = first_last_layers_bf16
    return n <= layer_index < num_layers - n


def layer_fp8_context(
    cfg: Config, backend: Optional[str], amax_group: Optional[Any] = None
) -> Callable[[int], ContextManager]:
    """A function from global layer index to the context that layer's forward runs in.

    `amax_group` is TE's `fp8_group` (the caller hands in the tensor x data x context
    parallel group, `nemotron_train.distributed.amax_reduction_group`; None: no reduction). BF16
    layers get a null context on TE (as in mcore) and a disabled one when emulated.
    The context must be entered *inside* anything that is recomputed (activation
    checkpointing re-runs the forward during backward, after the outer context has
    exited). With FP8 disabled every layer gets a null context."""
    fp8 = cfg.precision.fp8
    num_layers, n = cfg.model.num_layers, fp8.first_last_layers_bf16
    if not fp8.enabled or backend is None:
        return lambda index: nullcontext()
    if backend == "te":
        from nemotron_train.fp8.te import make_te_recipe, te_fp8_autocast

        recipe = make_te_recipe(fp8)
        return lambda index: te_fp8_autocast(layer_runs_in_fp8(index, num_layers, n), recipe, amax_group)
    if backend != "emulated":
        raise ValueError(f"backend must be 'te' or 'emulated', got {backend!r}")
    state = FP8RecipeState(FP8Recipe.from_config(fp8))
    # BF16 layers get an explicit disabled context so they stay BF16 even inside an
    # enclosing FP8 region.
    return lambda index: fp8_autocast(layer_runs_in_fp8(index, num_layers, n), state)


def fp8_end_of_step(model: Any, cfg: Config, backend: Optional[str], amax_group: Optional[Any] = None) -> int:
    """Advance emulated delayed scaling by one step (TE does its own bookkeeping).

    Call after the optimizer step, once per global step (not per micro-batch), on every
    rank. Returns the number of linears updated (0 unless emulated delayed scaling)."""
    fp8 = cfg.precision.fp8
    if not fp8.enabled or backend != "emulated" or fp8.recipe != "delayed":
        return 0
    return advance_delayed_scaling(model, FP8Recipe.from_config(fp8), amax_group)
