"""The `resilience` section: the drill-fault grammar and the section's cross-field checks.

A drill fault is `KIND@STEP:RANK` (several, comma-separated): poison the loss or one
gradient of rank RANK at training step STEP (1-based, the step number the console prints).
Kinds are the schema's `InjectKind` values:

    nan_loss, inf_loss   the rank's loss becomes NaN / Inf (its gradients follow)
    spike_loss           the rank's loss is multiplied by SPIKE_INJECTION_FACTOR
    nan_grad, inf_grad   one element of one local gradient becomes NaN / Inf, after the
                         backward pass and before the data-parallel reduction
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

from nemotron_train.config.schema import Config, InjectKind, choices
from nemotron_train.errors import ConfigError

# 2x Megatron's default spike factor: an injected spike is always over the threshold.
SPIKE_INJECTION_FACTOR = 20.0

_FAULT = re.compile(r"^\s*([a-z_]+)\s*@\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int

    def __str__(self) -> str:
        return f"{self.kind}@{self.step}:{self.rank}"


def parse_faults(text: str) -> List[Fault]:
    """`"nan_loss@5:1, nan_grad@9:0"` -> [Fault('nan_loss', 5, 1), Fault('nan_grad', 9, 0)]."""
    faults: List[Fault] = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        m = _FAULT.match(item)
        if not m or m.group(1) not in choices(InjectKind):
            raise ConfigError(
                f"resilience.inject: {item.strip()!r} is not KIND@STEP:RANK with KIND one of "
                f"{', '.join(choices(InjectKind))} (e.g. nan_loss@5:1)"
            )
        faults.append(Fault(m.group(1), int(m.group(2)), int(m.group(3))))
    return faults


def check_resilience(cfg: Config, world_size: int) -> None:
    r = cfg.resilience
    for fault in parse_faults(r.inject):
        if fault.step < 1:
            raise ConfigError(f"resilience.inject: {fault} has step {fault.step}; steps count from 1")
        if fault.rank >= world_size:
            raise ConfigError(f"resilience.inject: {fault} names rank {fault.rank} but the run has {world_size} ranks (0..{world_size - 1})")
    if r.spike_factor < 0 or 0 < r.spike_factor <= 1:
        raise ConfigError(f"resilience.spike_factor={r.spike_factor} must be > 1 (a multiple of the largest loss seen), or 0 for off")
    if r.spike_window < 1:
        raise ConfigError(f"resilience.spike_window={r.spike_window} must be >= 1 (losses sampled before spikes are flagged)")
    if r.max_skipped_steps < 1:
        raise ConfigError(f"resilience.max_skipped_steps={r.max_skipped_steps} must be >= 1")
    if any(s < 1 for s in r.skip_steps):
        raise ConfigError(f"resilience.skip_steps={r.skip_steps}: steps count from 1")
    if r.error_injection_rate < 0:
        raise ConfigError(f"resilience.error_injection_rate={r.error_injection_rate} must be >= 0 (0 = off)")
    if r.error_injection_rate and r.rerun_mode == "disabled":
        raise ConfigError(
            "resilience.error_injection_rate needs resilience.rerun_mode=validate_results: megatron-core's "
            "RerunStateMachine injects errors only when it validates results"
        )
    if r.hang_timeout_s < 0:
        raise ConfigError(f"resilience.hang_timeout_s={r.hang_timeout_s} must be >= 0 (seconds, 0 = off)")
    if r.collective_timeout_minutes <= 0:
        raise ConfigError(f"resilience.collective_timeout_minutes={r.collective_timeout_minutes} must be > 0")
    if r.straggler_warn_ratio < 1:
        raise ConfigError(f"resilience.straggler_warn_ratio={r.straggler_warn_ratio} must be >= 1 (slowest / fastest)")
    if cfg.launch.max_restarts < 0:
        raise ConfigError(f"launch.max_restarts={cfg.launch.max_restarts} must be >= 0")
