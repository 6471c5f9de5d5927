"""Process groups: torch.distributed + megatron-core model-parallel groups, passed explicitly.

This is the only module that reads megatron-core's global `parallel_state`; everything else
receives a `ProcessGroupCollection` (or a group from it) as an argument.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from nemotron_train.config.schema import Config
from nemotron_train.platform import Platform, init_distributed


def init_process_groups(cfg: Config, platform: Platform) -> ProcessGroupCollection:
    """Create TP/PP/DP groups for the configured layout and seed the model-parallel RNGs."""
    init_distributed(platform, timeout_minutes=cfg.resilience.collective_timeout_minutes)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tp,
            pipeline_model_parallel_size=cfg.parallel.pp,
            context_parallel_size=cfg.parallel.cp,
            distributed_timeout_minutes=cfg.resilience.collective_timeout_minutes,
        )
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def amax_reduction_group(pgs: Optional[ProcessGroupCollection]) -> Optional[Any]:
    """The FP8 amax-reduction group (tensor x data x context parallel, as mcore gives TE);
    None without process groups (a single process: nothing to reduce over)."""
    return None if pgs is None else pgs.tp_dp_cp


def destroy_process_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
