"""TransformerEngine recipe objects for `precision.fp8` (the `te` backend).

TE is imported lazily: this module loads without it. `te_recipe_kwargs` is the pure part
(which class, which arguments) and is what the tests check; `make_te_recipe` only turns
names into TE objects. The TE path is not exercised by this repository's CI.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Optional, Tuple

from nemotron_train.config.schema import FP8Config

TE_RECIPE_CLASSES = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "mxfp8": "MXFP8BlockScaling",
    "blockwise": "Float8BlockScaling",
}
TE_FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}


def te_recipe_kwargs(fp8: FP8Config) -> Tuple[str, Dict[str, Any]]:
    """(class name in `transformer_engine.common.recipe`, constructor kwargs).

    `fp8_format` is given by its `Format` member name. Only DelayedScaling takes margin and
    history settings; check_fp8_config refuses a margin for the other TE recipes rather
    than dropping it silently."""
    if fp8.recipe not in TE_RECIPE_CLASSES:
        raise ValueError(f"no TransformerEngine recipe for precision.fp8.recipe={fp8.recipe!r}")
    kwargs: Dict[str, Any] = {"fp8_format": TE_FORMATS[fp8.format]}
    if fp8.recipe == "delayed":
        kwargs.update(
            margin=fp8.margin,
            amax_history_len=fp8.amax_history_len,
            amax_compute_algo=fp8.amax_compute_algo,
        )
    return TE_RECIPE_CLASSES[fp8.recipe], kwargs


def make_te_recipe(fp8: FP8Config) -> Any:
    """Build the TE recipe object (needs transformer_engine)."""
    from transformer_engine.common import recipe as te_recipe

    name, kwargs = te_recipe_kwargs(fp8)
    kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
    return getattr(te_recipe, name)(**kwargs)


def te_fp8_autocast(enabled: bool, recipe: Any, amax_group: Optional[Any] = None) -> ContextManager:
    """TE's autocast for one region; a null context when disabled."""
    if not enabled:
        return nullcontext()
    import transformer_engine.pytorch as te

    # TE >= 2.8 names it `autocast(recipe=, amax_reduction_group=)`; `fp8_autocast` remains as
    # a deprecated shim that warns on every call (once per layer per micro-batch here).
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def te_fp8_model_init(enabled: bool, recipe: Any) -> ContextManager:
    """TE's context for building modules whose weights are FP8 tensors (what
    `fp8_param_gather` all-gathers); a null context when disabled. TE >= 2.8 calls it
    `quantized_model_init`, older TE `fp8_model_init`."""
    if not enabled:
        return nullcontext()
    import transformer_engine.pytorch as te

    if hasattr(te, "quantized_model_init"):
        return te.quantized_model_init(enabled=True, recipe=recipe)
    return te.fp8_model_init(enabled=True, recipe=recipe)
