"""mcore DDP wrap, mcore optimizer (distributed by default) and the LR schedule."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from nemotron_train.config.schema import Config
from nemotron_train.models.engine_config import ddp_kwargs, optimizer_kwargs
from nemotron_train.resolve import ResolvedRun, resolve_run

# Our scheduler.type -> mcore's lr_decay_style.
_DECAY_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def _resolved(cfg: Config, run: Optional[ResolvedRun]) -> ResolvedRun:
    """The trainer hands its resolved run in; tools and test harnesses that hold only a config
    get it resolved here for this process's world (the same, deterministic decisions)."""
    if run is not None:
        return run
    import torch.distributed as dist

    return resolve_run(cfg, dist.get_world_size() if dist.is_initialized() else 1)


def wrap_ddp(cfg: Config, model: torch.nn.Module, tcfg: TransformerConfig, pgs: ProcessGroupCollection,
             run: Optional[ResolvedRun] = None) -> DistributedDataParallel:
    """mcore DDP with the resolved performance.* (overlap, buckets) and FP8 param gather."""
    ddp_config = DistributedDataParallelConfig(**ddp_kwargs(_resolved(cfg, run)))
    return DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module], run: Optional[ResolvedRun] = None):
    return get_megatron_optimizer(McoreOptimizerConfig(**optimizer_kwargs(_resolved(cfg, run))), model_chunks)


@contextmanager
def params_synced(model: DistributedDataParallel) -> Iterator[None]:
    """Parameters all-gathered now, for a region that reads them outside a training forward
    (evaluation, checkpoint save). With `overlap_param_gather` the distributed optimizer's
    updated shards are gathered by forward pre-hooks of the next training step; as Megatron
    does, the hooks come off (gathering synchronously) for the region and go back on after."""
    if not getattr(model, "use_forward_hook", False):
        yield
        return
    model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        model.enable_forward_pre_hook()


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Step counts are in samples, as in Megatron, so a batch-size ramp keeps the schedule."""
    s, o, t = cfg.scheduler, cfg.optimizer, cfg.train
    gbs = t.global_batch_size
    decay_steps = s.decay_steps if s.decay_steps is not None else t.steps
    wsd_decay = s.wsd_decay_steps if s.wsd_decay_steps is not None else max(1, decay_steps // 10)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr if s.type != "constant" else o.lr,
        lr_warmup_steps=s.warmup_steps * gbs,
        lr_decay_steps=max(decay_steps * gbs, s.warmup_steps * gbs + 1),
        lr_decay_style=_DECAY_STYLE[s.type],
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.steps * gbs,
        wd_incr_style="constant",
        # Which schedule wins on resume; the checkpointer prints what changed (old -> new).
        use_checkpoint_opt_param_scheduler=s.use_checkpoint_schedule,
        override_opt_param_scheduler=not s.use_checkpoint_schedule,
        wsd_decay_steps=wsd_decay * gbs if s.type == "wsd" else None,
        lr_wsd_decay_style=s.wsd_decay_style if s.type == "wsd" else None,
    )
