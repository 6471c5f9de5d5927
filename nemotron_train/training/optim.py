"""mcore DDP wrap, mcore optimizer (distributed by default) and the LR schedule."""

from __future__ import annotations

from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from nemotron_train.config.schema import Config

# Our scheduler.type -> mcore's lr_decay_style.
_DECAY_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def wrap_ddp(cfg: Config, model: torch.nn.Module, tcfg: TransformerConfig, pgs: ProcessGroupCollection) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        # One bucket keeps the reduction order fixed, which deterministic mode needs.
        bucket_size=None,
    )
    return DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module]):
    o = cfg.optimizer
    bf16 = cfg.precision.params_dtype == "bf16"
    mcfg = McoreOptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    return get_megatron_optimizer(mcfg, model_chunks)


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
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd_decay * gbs if s.type == "wsd" else None,
        lr_wsd_decay_style=s.wsd_decay_style if s.type == "wsd" else None,
    )
