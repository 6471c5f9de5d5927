"""FP8 training: recipes, backend checks, TransformerEngine recipes and a pure-torch emulation.

See docs/fp8.md. The emulated backend runs anywhere (CPU included) and is the reference
the TE path is compared against on GPUs.
"""

from nemotron_train.fp8.checks import (
    check_fp8_config,
    device_capability,
    te_available,
    te_version,
)
from nemotron_train.fp8.gemm import FP8GemmFunction, TensorQuantizer, fp8_linear
from nemotron_train.fp8.linear import (
    FP8ColumnParallelLinear,
    FP8RowParallelLinear,
    advance_delayed_scaling,
    fp8_linears,
)
from nemotron_train.fp8.quantize import (
    compute_scale,
    power_of_two_scale,
    quantize_blockwise,
    quantize_current,
    quantize_scaled,
    tensor_amax,
)
from nemotron_train.fp8.recipe import (
    FP8Recipe,
    FP8RecipeState,
    active_fp8_state,
    fp8_autocast,
    fp8_max,
    is_fp8_enabled,
)
from nemotron_train.fp8.runtime import fp8_end_of_step, layer_fp8_context, layer_runs_in_fp8
from nemotron_train.fp8.scaling import update_history_and_scale
from nemotron_train.fp8.te import make_te_recipe, te_recipe_kwargs

__all__ = [
    "FP8ColumnParallelLinear",
    "FP8GemmFunction",
    "FP8Recipe",
    "FP8RecipeState",
    "FP8RowParallelLinear",
    "TensorQuantizer",
    "active_fp8_state",
    "advance_delayed_scaling",
    "check_fp8_config",
    "compute_scale",
    "device_capability",
    "fp8_autocast",
    "fp8_end_of_step",
    "fp8_linear",
    "fp8_linears",
    "fp8_max",
    "is_fp8_enabled",
    "layer_fp8_context",
    "layer_runs_in_fp8",
    "make_te_recipe",
    "power_of_two_scale",
    "quantize_blockwise",
    "quantize_current",
    "quantize_scaled",
    "te_available",
    "te_recipe_kwargs",
    "te_version",
    "tensor_amax",
    "update_history_and_scale",
]
