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


class LayerFP8Contexts:
    """The FP8 contexts of a layer stack, by global layer index.

    - `ctx(index)`: the context one layer's forward runs in;
    - `ctx.outer()`: the context around the whole stack's forward (TE delayed scaling: one
      region, so amaxes are reduced once per forward, as megatron-core does; per-layer
      regions would reduce them at every layer exit, which mcore's own comment calls wrong);
    - `ctx.init(index)`: the context a layer is *built* in (TE's FP8 model init when
      `precision.fp8.fp8_param_gather`: the weights are FP8 tensors the DDP gathers as FP8)."""

    def __init__(self, per_layer: Callable[[int], ContextManager], outer: Callable[[], ContextManager] = nullcontext,
                 init: Optional[Callable[[int], ContextManager]] = None) -> None:
        self._per_layer = per_layer
        self.outer = outer
        self.init = init or (lambda index: nullcontext())

    def __call__(self, index: int) -> ContextManager:
        return self._per_layer(index)


def layer_fp8_context(cfg: Config, backend: Optional[str], amax_group: Optional[Any] = None) -> LayerFP8Contexts:
    """The FP8 contexts of the model's layers (see LayerFP8Contexts).

    `amax_group` is TE's `fp8_group` (the caller hands in the tensor x data x context
    parallel group, `nemotron_train.distributed.amax_reduction_group`; None: no reduction). BF16
    layers get a null context on TE (as in mcore) and a disabled one when emulated.
    The per-layer context must be entered *inside* anything that is recomputed (activation
    checkpointing re-runs the forward during backward, after the outer context has
    exited). With FP8 disabled every context is a null context."""
    fp8 = cfg.precision.fp8
    num_layers, n = cfg.model.num_layers, fp8.first_last_layers_bf16
    if not fp8.enabled or backend is None:
        return LayerFP8Contexts(lambda index: nullcontext())
    if backend == "te":
        from nemotron_train.fp8.te import make_te_recipe, te_fp8_autocast, te_fp8_model_init

        recipe = make_te_recipe(fp8)
        init = None
        if fp8.fp8_param_gather:
            init = lambda index: te_fp8_model_init(layer_runs_in_fp8(index, num_layers, n), recipe)  # noqa: E731
        if fp8.recipe == "delayed":  # no BF16 layers with delayed scaling (checks.py refuses them)
            return LayerFP8Contexts(lambda index: nullcontext(), lambda: te_fp8_autocast(True, recipe, amax_group), init)
        return LayerFP8Contexts(
            lambda index: te_fp8_autocast(layer_runs_in_fp8(index, num_layers, n), recipe, amax_group), init=init
        )
    if backend not in ("emulated", "scaled_mm"):
        raise ValueError(f"backend must be 'te', 'emulated' or 'scaled_mm', got {backend!r}")
    state = FP8RecipeState(FP8Recipe.from_config(fp8), gemm=backend)
    # BF16 layers get an explicit disabled context so they stay BF16 even inside an
    # enclosing FP8 region.
    return LayerFP8Contexts(lambda index: fp8_autocast(layer_runs_in_fp8(index, num_layers, n), state))


def fp8_end_of_step(model: Any, cfg: Config, backend: Optional[str], amax_group: Optional[Any] = None) -> int:
    """Advance emulated delayed scaling by one step (TE does its own bookkeeping).

    Call after the optimizer step, once per global step (not per micro-batch), on every
    rank. Returns the number of linears updated (0 unless emulated delayed scaling)."""
    fp8 = cfg.precision.fp8
    if not fp8.enabled or backend != "emulated" or fp8.recipe != "delayed":
        return 0
    return advance_delayed_scaling(model, FP8Recipe.from_config(fp8), amax_group)
