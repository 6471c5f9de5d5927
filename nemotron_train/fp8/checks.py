"""Which FP8 settings a backend and GPU can run; refused combinations raise ConfigError.

Backends:
- `te`: TransformerEngine FP8 GEMMs in the TE layer spec (CUDA GPU with TE).
- `emulated`: pure-torch fake quantisation in the local layer spec's linears (any device).
- `scaled_mm`: real FP8 GEMMs through `torch._scaled_mm` in the local spec's linears
  (CUDA sm_89+, tensorwise current scaling); `emulated` is its CPU twin.

`nemotron_train.resolve` turns `precision.fp8.backend=auto` into one of them (the only
place an `auto` is decided); `check_fp8_config` then refuses what that backend cannot do
with those layers on this GPU, before any model is built.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

from nemotron_train.config.loader import ConfigError
from nemotron_train.config.schema import AmaxComputeAlgo, Config, FP8Backend, FP8Format, FP8RecipeName, choices

Capability = Optional[Tuple[int, int]]

# Minimum TransformerEngine versions per recipe (the versions mcore 0.16 gates them on).
TE_MIN_VERSION = {"delayed": "1.0", "mxfp8": "2.1", "tensorwise": "2.2", "blockwise": "2.3"}
# FP8 tensor cores: Ada (8.9) and newer. MXFP8 needs data-centre Blackwell (10.x).
PER_TENSOR_MIN_CAPABILITY = (8, 9)
BLOCKWISE_MIN_CAPABILITY = (9, 0)
MXFP8_CAPABILITY_MAJOR = 10


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    """True when `transformer_engine.pytorch` imports (a broken install counts as absent)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - TE raises OSError/RuntimeError on CUDA mismatches too
        return False
    return True


def te_version() -> Optional[str]:
    """Installed TransformerEngine version string, or None without TE."""
    if not te_available():
        return None
    import transformer_engine

    found = getattr(transformer_engine, "__version__", None)
    if found:
        return str(found)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformer-engine", "transformer_engine"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def device_capability(device_type: str) -> Capability:
    """(major, minor) CUDA compute capability of the current device; None off CUDA."""
    if device_type != "cuda":
        return None
    import torch

    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def _version_at_least(found: str, minimum: str) -> bool:
    from packaging.version import Version

    # Dev builds ("2.3.0.dev0+abc") count as the release they precede.
    return Version(Version(found).base_version) >= Version(minimum)


def _check_values(cfg: Config) -> None:
    fp8 = cfg.precision.fp8
    for key, value, allowed in (
        ("format", fp8.format, choices(FP8Format)),
        ("recipe", fp8.recipe, choices(FP8RecipeName)),
        ("amax_compute_algo", fp8.amax_compute_algo, choices(AmaxComputeAlgo)),
        ("backend", fp8.backend, choices(FP8Backend)),
    ):
        if value not in allowed:
            raise ConfigError(f"precision.fp8.{key}={value!r} is not supported; use one of: {', '.join(allowed)}")
    if fp8.amax_history_len < 1:
        raise ConfigError(f"precision.fp8.amax_history_len={fp8.amax_history_len} must be >= 1")
    if fp8.margin < 0:
        raise ConfigError(f"precision.fp8.margin={fp8.margin} must be >= 0 (scales are divided by 2**margin)")
    n = fp8.first_last_layers_bf16
    if n < 0 or 2 * n > cfg.model.num_layers:
        raise ConfigError(
            f"precision.fp8.first_last_layers_bf16={n} must be between 0 and model.num_layers // 2 = "
            f"{cfg.model.num_layers // 2} (it keeps the first and the last {n} layers in BF16)"
        )


def _check_emulated(cfg: Config, spec: str, backend: str = "emulated") -> None:
    fp8 = cfg.precision.fp8
    if spec == "te":
        raise ConfigError(
            f"precision.fp8.backend={backend} with model.spec=te: {backend} FP8 lives in the local spec's linears, "
            "so TE layers would silently stay in BF16; use model.spec=local, or precision.fp8.backend=te"
        )
    if fp8.fp8_param_gather:
        raise ConfigError(
            "precision.fp8.fp8_param_gather=true needs TransformerEngine FP8 weights; the emulated backend keeps "
            "weights in precision.params_dtype. Set precision.fp8.fp8_param_gather=false or use precision.fp8.backend=te"
        )
    if fp8.margin and fp8.recipe in ("mxfp8", "blockwise"):
        raise ConfigError(
            f"precision.fp8.margin={fp8.margin} with precision.fp8.recipe={fp8.recipe}: block scales are powers of two "
            "chosen per block, there is no margin; set precision.fp8.margin=0"
        )


def _check_scaled_mm(cfg: Config, spec: str, capability: Capability) -> None:
    fp8 = cfg.precision.fp8
    if capability is None:
        raise ConfigError(
            "precision.fp8.backend=scaled_mm runs torch._scaled_mm FP8 GEMMs on a CUDA GPU; on CPU use "
            "precision.fp8.backend=emulated (the same scaling, in pure torch)"
        )
    if tuple(capability) < PER_TENSOR_MIN_CAPABILITY:
        raise ConfigError(
            f"precision.fp8.backend=scaled_mm needs FP8 tensor cores (compute capability 8.9+); this GPU is "
            f"sm_{capability[0]}{capability[1]}. Use precision.fp8.backend=emulated or turn FP8 off"
        )
    if fp8.recipe != "tensorwise":
        raise ConfigError(
            f"precision.fp8.backend=scaled_mm implements tensorwise current scaling only (recipe is {fp8.recipe}); "
            "set precision.fp8.recipe=tensorwise, or use precision.fp8.backend=te or emulated"
        )
    _check_emulated(cfg, spec, backend="scaled_mm")


def _check_te_device(fp8_recipe: str, capability: Capability) -> None:
    if capability is None:
        raise ConfigError(
            "precision.fp8.backend=te needs a CUDA GPU; use precision.fp8.backend=emulated (or auto) on CPU"
        )
    sm = f"sm_{capability[0]}{capability[1]}"
    if tuple(capability) < PER_TENSOR_MIN_CAPABILITY:
        raise ConfigError(
            f"FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); this GPU is {sm}. "
            "Set precision.fp8.enabled=false, or precision.fp8.backend=emulated to study FP8 numerics"
        )
    if fp8_recipe == "mxfp8" and capability[0] != MXFP8_CAPABILITY_MAJOR:
        raise ConfigError(
            f"precision.fp8.recipe=mxfp8 needs a data-centre Blackwell GPU (sm_100/sm_103) with TE; this GPU is {sm}. "
            "Use precision.fp8.recipe=tensorwise (or blockwise on Hopper), or precision.fp8.backend=emulated"
        )
    if fp8_recipe == "blockwise" and tuple(capability) < BLOCKWISE_MIN_CAPABILITY:
        raise ConfigError(
            f"precision.fp8.recipe=blockwise needs Hopper (sm_90) or newer with TE; this GPU is {sm}. "
            "Use precision.fp8.recipe=tensorwise or delayed"
        )


def _check_te(cfg: Config, spec: str, capability: Capability, found_version: Optional[str]) -> None:
    fp8 = cfg.precision.fp8
    _check_te_device(fp8.recipe, capability)
    if found_version is None:
        raise ConfigError(
            "precision.fp8.backend=te but transformer_engine is not importable; install the `gpu` extra "
            "or set precision.fp8.backend=emulated"
        )
    minimum = TE_MIN_VERSION[fp8.recipe]
    if not _version_at_least(found_version, minimum):
        raise ConfigError(
            f"precision.fp8.recipe={fp8.recipe} needs TransformerEngine >= {minimum}; found {found_version}. "
            "Upgrade TE or use precision.fp8.recipe=delayed"
        )
    if spec == "local":
        raise ConfigError(
            "precision.fp8.backend=te with model.spec=local: TE FP8 only applies to TE layers, so the local "
            "layers would silently stay in BF16; use model.spec=te (or auto), or precision.fp8.backend=emulated"
        )
    if fp8.margin and fp8.recipe != "delayed":
        raise ConfigError(
            f"precision.fp8.margin={fp8.margin}: TE only applies a margin with precision.fp8.recipe=delayed "
            f"(recipe is {fp8.recipe}); set precision.fp8.margin=0"
        )
    if fp8.recipe == "delayed" and fp8.first_last_layers_bf16:
        raise ConfigError(
            f"precision.fp8.first_last_layers_bf16={fp8.first_last_layers_bf16} with precision.fp8.recipe=delayed: "
            "TE reduces delayed-scaling amaxes when an autocast region exits, which per-layer BF16 regions "
            "break (megatron-core refuses it too). Use precision.fp8.recipe=tensorwise, or set "
            "precision.fp8.first_last_layers_bf16=0"
        )
    if fp8.fp8_param_gather and not cfg.optimizer.use_distributed_optimizer:
        raise ConfigError(
            "precision.fp8.fp8_param_gather=true all-gathers FP8 weights from the distributed optimizer's shards; "
            "set optimizer.use_distributed_optimizer=true or precision.fp8.fp8_param_gather=false"
        )


def check_fp8_config(
    cfg: Config,
    backend: str,
    device_capability: Capability,
    *,
    spec: Optional[str] = None,
    te_version_str: Optional[str] = None,
) -> None:
    """Raise ConfigError if `precision.fp8` can't run on `backend` with this GPU.

    `backend` is the resolved one ("te" | "emulated"); `device_capability` is the CUDA
    compute capability or None off CUDA; `spec` the resolved layer spec (default
    `model.spec`). `te_version_str` defaults to the installed TE.
    Value checks always run; combination checks only when FP8 is enabled (a disabled FP8
    section is ignored, so a BF16 ablation arm can share a config with the FP8 arm)."""
    if backend not in ("te", "emulated", "scaled_mm"):
        raise ValueError(f"check_fp8_config takes a resolved backend ('te', 'emulated', 'scaled_mm'), got {backend!r}")
    _check_values(cfg)
    if not cfg.precision.fp8.enabled:
        return
    spec = spec or cfg.model.spec
    if backend == "emulated":
        _check_emulated(cfg, spec)
    elif backend == "scaled_mm":
        _check_scaled_mm(cfg, spec, device_capability)
    else:
        _check_te(cfg, spec, device_capability, te_version_str if te_version_str is not None else te_version())
