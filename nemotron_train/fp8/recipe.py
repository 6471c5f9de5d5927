"""FP8 recipes as plain data, and the autocast context that switches FP8 on for a region.

`fp8_autocast(enabled, recipe_state)` mirrors TransformerEngine's `fp8_autocast`: modules
that support FP8 (our `FP8ColumnParallelLinear` / `FP8RowParallelLinear`) read the active
state when their forward runs and capture it for their backward, so the backward pass uses
the recipe of the forward even though it runs after the context has exited. The context is
a `contextvars.ContextVar`, so nested contexts (a BF16 layer inside an FP8 region) and
threads behave like ordinary scoping.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from nemotron_train.config.schema import AmaxComputeAlgo, FP8Backend, FP8Config, FP8Format, FP8RecipeName, choices

# The schema's Literal types are the one list of allowed values.
FORMATS = choices(FP8Format)
RECIPES = choices(FP8RecipeName)
AMAX_COMPUTE_ALGOS = choices(AmaxComputeAlgo)
BACKENDS = choices(FP8Backend)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2

# Block shapes (rows, cols) of the block-scaled recipes, per GEMM operand role. The last
# dimension of every operand is the forward contraction dimension. MXFP8 scales every 32
# consecutive values; TE's Float8BlockScaling uses 1x128 tiles for activations and
# gradients and 128x128 tiles for weights.
BLOCK_SHAPES = {
    "mxfp8": {"input": (1, 32), "weight": (1, 32), "grad_output": (1, 32)},
    "blockwise": {"input": (1, 128), "weight": (128, 128), "grad_output": (1, 128)},
}

ROLES = ("input", "weight", "grad_output")


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype: 448 for E4M3, 57344 for E5M2."""
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class FP8Recipe:
    """What an FP8 GEMM does; built from `precision.fp8` (see `from_config`)."""

    recipe: str = "tensorwise"
    format: str = "hybrid"
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"

    def __post_init__(self) -> None:
        # Programming errors only: user configs are checked with messages by check_fp8_config.
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown FP8 recipe {self.recipe!r}; expected one of {RECIPES}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown FP8 format {self.format!r}; expected one of {FORMATS}")
        if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
            raise ValueError(f"unknown amax_compute_algo {self.amax_compute_algo!r}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")

    @classmethod
    def from_config(cls, fp8: FP8Config) -> "FP8Recipe":
        return cls(
            recipe=fp8.recipe,
            format=fp8.format,
            margin=fp8.margin,
            amax_history_len=fp8.amax_history_len,
            amax_compute_algo=fp8.amax_compute_algo,
        )

    @property
    def forward_dtype(self) -> torch.dtype:
        """Inputs and weights are E4M3 in both formats (more mantissa, enough range)."""
        return E4M3

    @property
    def backward_dtype(self) -> torch.dtype:
        """Output gradients: E5M2 under `hybrid` (they need range), E4M3 under `e4m3`."""
        return E5M2 if self.format == "hybrid" else E4M3

    def dtype_for(self, role: str) -> torch.dtype:
        return self.backward_dtype if role == "grad_output" else self.forward_dtype

    @property
    def is_delayed(self) -> bool:
        return self.recipe == "delayed"

    @property
    def is_block_scaled(self) -> bool:
        return self.recipe in BLOCK_SHAPES


@dataclass(frozen=True)
class FP8RecipeState:
    """What an enabled `fp8_autocast` region carries to the modules inside it.

    Per-tensor state (delayed-scaling histories) lives in the modules; the amax reduction
    groups are the modules' tensor-parallel group (sequence-parallel inputs) and the group
    given to `fp8_end_of_step` (delayed scaling)."""

    recipe: FP8Recipe = FP8Recipe()
    # "emulated": fake-quantised operands through mcore's GEMM; "scaled_mm": real FP8 GEMMs.
    gemm: str = "emulated"


_ACTIVE: contextvars.ContextVar[Optional[FP8RecipeState]] = contextvars.ContextVar(
    "nemotron_train_fp8_state", default=None
)


@contextmanager
def fp8_autocast(enabled: bool = True, recipe_state: Optional[FP8RecipeState] = None) -> Iterator[None]:
    """Run FP8-capable modules in FP8 (`enabled=True`) or in their own precision (`False`).

    `enabled=False` inside an enabled region turns FP8 off for the inner region, which is
    how the first/last BF16 layers are kept out of FP8."""
    if enabled and recipe_state is None:
        recipe_state = FP8RecipeState()
    token = _ACTIVE.set(recipe_state if enabled else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_fp8_enabled() -> bool:
    return _ACTIVE.get() is not None


def active_fp8_state() -> Optional[FP8RecipeState]:
    """The state of the innermost enabled `fp8_autocast`, or None outside FP8 regions."""
    return _ACTIVE.get()
