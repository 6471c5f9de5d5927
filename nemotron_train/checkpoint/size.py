"""How big a run's checkpoint is and how long a save takes at a given filesystem bandwidth,
from the cost model's parameter counts (no torch: `plan` uses it).

What one checkpoint stores per parameter (strategy.py): the model weight in
`precision.params_dtype`, and the optimizer's fp32 main copy plus its states (Adam:
exp_avg and exp_avg_sq; SGD: the momentum buffer), all fp32. Every rank writes its own
part: the weights and optimizer state of its TP/PP shard, split across its data-parallel
replicas, so a rank writes about (shard parameters x bytes per parameter) / DP.
"""

from __future__ import annotations

from typing import Any, Dict

from nemotron_train.config.schema import Config

# Aggregate write bandwidth a training job typically gets from a shared Lustre filesystem
# (a handful of object storage targets at a few GB/s each); `plan --fs-gbps` sets yours.
LUSTRE_TYPICAL_GBPS = 20.0
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def bytes_per_param(cfg: Config) -> int:
    states = 2 if cfg.optimizer.name == "adam" else 1
    return _DTYPE_BYTES[cfg.precision.params_dtype] + 4 * (1 + states)


def checkpoint_cost(plan: Dict[str, Any], cfg: Config, fs_gbps: float = LUSTRE_TYPICAL_GBPS) -> Dict[str, Any]:
    """Checkpoint bytes (total and per rank, heaviest stage) and the save time at `fs_gbps`
    GB/s of aggregate write bandwidth, for a plan from models.cost.compute_plan."""
    if fs_gbps <= 0:
        raise ValueError(f"filesystem bandwidth must be positive, got {fs_gbps} GB/s")
    per_param = bytes_per_param(cfg)
    total = plan["total_params"] * per_param
    per_rank = plan["params_per_rank"] * per_param / plan["parallel"]["dp"]
    return {
        "total_bytes": int(total),
        "per_rank_bytes": int(per_rank),
        "bytes_per_param": per_param,
        "fs_gbps": fs_gbps,
        "save_seconds": total / (fs_gbps * 1e9),
    }
