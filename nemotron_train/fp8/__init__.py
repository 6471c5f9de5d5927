"""FP8 training: recipes, backend checks, TransformerEngine recipes and a pure-torch emulation.

See docs/fp8.md. The emulated backend runs anywhere (CPU included) and is the reference
the TE path is compared against on GPUs.
"""

import importlib
from typing import Any

# Public names and the submodule each lives in, imported on first use: the FP8 checks that
# every launch runs (`nemotron_train.fp8.checks`) must not pull in torch and megatron-core.
_LAZY = {
    "FP8ColumnParallelLinear": "linear",
    "FP8GemmFunction": "gemm",
    "FP8Recipe": "recipe",
    "FP8RecipeState": "recipe",
    "FP8RowParallelLinear": "linear",
    "TensorQuantizer": "gemm",
    "active_fp8_state": "recipe",
    "advance_delayed_scaling": "linear",
    "check_fp8_config": "checks",
    "compute_scale": "quantize",
    "device_capability": "checks",
    "fp8_autocast": "recipe",
    "fp8_end_of_step": "runtime",
    "fp8_linear": "gemm",
    "fp8_linears": "linear",
    "fp8_max": "recipe",
    "is_fp8_enabled": "recipe",
    "layer_fp8_context": "runtime",
    "layer_runs_in_fp8": "runtime",
    "make_te_recipe": "te",
    "power_of_two_scale": "quantize",
    "quantize_blockwise": "quantize",
    "quantize_current": "quantize",
    "quantize_scaled": "quantize",
    "te_available": "checks",
    "te_recipe_kwargs": "te",
    "te_version": "checks",
    "tensor_amax": "quantize",
    "update_history_and_scale": "scaling",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
