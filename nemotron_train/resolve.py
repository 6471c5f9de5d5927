"""Resolve once: a loaded config plus the real world size and device -> a `ResolvedRun`.

Every launch mode (self-launch preflight, each torchrun / srun rank, `plan`, `export-hf`,
`score`) calls `resolve_run` once per process and hands its result downstream. The `auto`
choices are made here and nowhere else:

- `model.spec: auto` -> `te` on CUDA when TE, mamba-ssm and causal-conv1d are installed,
  else `local`;
- `precision.fp8.backend: auto` -> the FP8 of the layers that will run: `te` with the te
  spec, `emulated` with the local spec (FP8 of another kind would silently stay BF16).

Then the FP8 settings are checked against the backend, the layers and this GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemotron_train.config.performance import Performance, resolve_performance
from nemotron_train.config.schema import Config
from nemotron_train.config.validate import validate_config
from nemotron_train.errors import ConfigError
from nemotron_train.fp8.checks import Capability, check_fp8_config, device_capability
from nemotron_train.platform import Platform, check_environment, detect_platform, missing_gpu_kernels


@dataclass(frozen=True)
class ResolvedRun:
    cfg: Config
    world_size: int
    dp_size: int
    platform: Platform
    spec: str  # "te" | "local"
    fp8_backend: Optional[str]  # "te" | "emulated"; None when FP8 is off
    capability: Capability  # CUDA compute capability; None off CUDA
    performance: Performance  # performance.* with every auto decided for this platform

    @property
    def device_type(self) -> str:
        return self.platform.device_type


def resolve_spec(requested: str, device_type: str, missing_kernels: list) -> str:
    """`te` or `local` for `model.spec`; `missing_kernels` are the absent GPU kernel packages."""
    if requested == "auto":
        return "te" if device_type == "cuda" and not missing_kernels else "local"
    if requested == "te" and device_type != "cuda":
        raise ConfigError("model.spec=te needs a CUDA GPU with transformer-engine and mamba-ssm; use model.spec=local on CPU")
    if requested == "te" and missing_kernels:
        raise ConfigError(
            f"model.spec=te: {', '.join(missing_kernels)} not importable; install the `gpu` extra or use model.spec=local"
        )
    return requested


def resolve_fp8_backend(requested: str, spec: str) -> str:
    """`te` or `emulated` for `precision.fp8.backend`: `auto` follows the resolved layer spec."""
    if requested == "auto":
        return "te" if spec == "te" else "emulated"
    return requested


def resolve_run(
    cfg: Config,
    world_size: int,
    platform: Optional[Platform] = None,
    *,
    capability: Capability = None,
    missing_kernels: Optional[list] = None,
    te_version: Optional[str] = None,
) -> ResolvedRun:
    """Validate `cfg` for `world_size` ranks on `platform` (default: this machine) and make
    every `auto` choice. Raises ConfigError naming the key for the first problem.
    `capability`, `missing_kernels` and `te_version` default to this machine's; `plan`
    passes those of the GPU it plans for."""
    check_environment()  # NEMOTRON_TRAIN_* variables, in every launch mode
    dp_size = validate_config(cfg, world_size)
    platform = platform or detect_platform()
    if missing_kernels is None:
        missing_kernels = missing_gpu_kernels() if platform.device_type == "cuda" else []
    if capability is None:
        capability = device_capability(platform.device_type)
    spec = resolve_spec(cfg.model.spec, platform.device_type, missing_kernels)
    backend = resolve_fp8_backend(cfg.precision.fp8.backend, spec)
    check_fp8_config(cfg, backend, capability, spec=spec, te_version_str=te_version)
    if te_version is None and spec == "te":
        from nemotron_train.fp8.checks import te_version as installed_te_version

        te_version = installed_te_version()
    performance = resolve_performance(cfg, platform.device_type, spec, te_version)
    return ResolvedRun(
        cfg=cfg,
        world_size=world_size,
        dp_size=dp_size,
        platform=platform,
        spec=spec,
        fp8_backend=backend if cfg.precision.fp8.enabled else None,
        capability=capability,
        performance=performance,
    )
