"""The pretraining loop. Setup runs in a fixed order:
resolved run (config, validated once, with its spec and FP8 backend: nemotron_train.resolve)
-> platform -> process groups -> model from spec -> DDP wrap -> optimizer -> data
-> checkpoint resume -> train.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
    unset_num_microbatches_calculator,
    update_num_microbatches,
)

from nemotron_train import rundir
from nemotron_train.checkpoint import TrainState, install_mcore_fixes
from nemotron_train.checkpoint.lock import lock_run_dir
from nemotron_train.config import Config, save_config
from nemotron_train.distributed.groups import amax_reduction_group, init_process_groups
from nemotron_train.distributed.hosts import describe_rank_hosts, rank_hosts
from nemotron_train.fp8 import fp8_end_of_step
from nemotron_train.models.build import build_model
from nemotron_train.models.cost import compute_plan
from nemotron_train.platform import setup_platform
from nemotron_train.resolve import ResolvedRun
from nemotron_train.training.metrics import MetricsLogger
from nemotron_train.training.resilience import BadStepError, StepGuard
from nemotron_train.training.cuda_graphs import CudaGraphCapture
from nemotron_train.training.manual_gc import ManualGC
from nemotron_train.training.optim import build_optimizer, build_scheduler, params_synced, wrap_ddp
from nemotron_train.training.step import eval_step, train_step
from nemotron_train.training.stop import install_stop_handler


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _tp_rank0_flag(value: bool, pgs) -> bool:
    """TP rank 0's `value` on every rank of its TP group (only rank 0 built the datasets)."""
    if pgs.tp.size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(pgs.tp, 0), group=pgs.tp)
    return bool(box[0])


def _flops_per_token(cfg: Config, world_size: int) -> Tuple[float, float]:
    """Model FLOPs per token (for MFU) and hardware FLOPs with recompute (for HFU)."""
    plan = compute_plan(cfg, world_size=world_size)
    return float(plan["flops_per_token"]), float(plan["hardware_flops_per_token"])


class Trainer:
    def __init__(self, run: ResolvedRun):
        cfg = self.cfg = run.cfg
        # First: a stop signal that arrives during setup is recorded and honoured at the first step.
        self.signals = install_stop_handler(cfg.train.exit_signal)
        # --- the run was resolved (validated) before this; now platform and process groups
        self.dp_size = run.dp_size
        self.platform = setup_platform(torch_compile=run.performance.torch_compile, deterministic=cfg.train.deterministic)
        install_mcore_fixes()
        self.pgs = init_process_groups(cfg, self.platform)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.run_lock = lock_run_dir(cfg.run.output_dir, self.rank)  # one run per output directory
        hosts = rank_hosts()  # one line that shows where a multi-node job's ranks really run
        if self.rank == 0:
            print(describe_rank_hosts(hosts), flush=True)
        self.dp_rank = self.pgs.dp.rank()
        self.device = self.platform.device
        # Explicitly, before megatron-core's DDP asks for it: the rerun state machine and the checks.
        self.guard = StepGuard(cfg, self.rank, self.world_size)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        # --- model from spec, DDP, optimizer, schedule
        model = build_model(run, self.pgs)
        self.fp8_backend = run.fp8_backend
        self.tcfg = model.config
        # Per-token loss over the global batch: grads are divided by the global token count.
        self.tcfg.calculate_per_token_loss = True
        self.model = wrap_ddp(cfg, model, self.tcfg, self.pgs, run=run)
        self.optimizer = build_optimizer(cfg, [self.model], run=run)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.tcfg.grad_scale_func = self.optimizer.scale_loss
        self.tcfg.finalize_model_grads_func = self.guard.wrap_finalize(finalize_model_grads)
        self.tcfg.no_sync_func = self.model.no_sync
        unset_num_microbatches_calculator()
        t = cfg.train
        init_num_microbatches_calculator(
            self.rank, cfg.scheduler.rampup_batch_size or None, t.global_batch_size, t.micro_batch_size, self.dp_size
        )
        # --- data
        from nemotron_train.data import build_datasets, build_tokenizer

        from nemotron_train.data.broadcast import reads_data

        self.tokenizer = build_tokenizer(cfg)
        # Only TP rank 0 reads the files; the other TP ranks get its batches by broadcast.
        self.train_ds, self.valid_ds, _ = build_datasets(cfg, self.tokenizer, built_on_this_rank=reads_data(self.pgs))
        self.has_valid = _tp_rank0_flag(self.valid_ds is not None, self.pgs)
        # --- checkpoint resume
        from nemotron_train.checkpoint import Checkpointer

        self.checkpointer = Checkpointer(cfg, self.pgs, is_logging_rank=self.rank == 0)
        self.state = self.checkpointer.load_latest(self.model, self.optimizer, self.scheduler) or TrainState()
        model_flops, hardware_flops = _flops_per_token(cfg, self.world_size)
        self.metrics = MetricsLogger(cfg, self.rank == 0, model_flops, self.world_size, self.platform.device_type,
                                     fp8_gemms=run.fp8_backend in ("te", "scaled_mm"),
                                     hardware_flops_per_token=hardware_flops)
        self.manual_gc = ManualGC(run.performance.manual_gc, run.performance.manual_gc_interval)
        self.cuda_graphs = CudaGraphCapture(run, self.model, self.tcfg, self.optimizer)

    # ------------------------------------------------------------------ loop

    def _train_iterator(self):
        from nemotron_train.data import make_train_iterator
        from nemotron_train.data.broadcast import tp_broadcast_iterator

        t = self.cfg.train
        source = None
        if self.train_ds is not None:
            source = make_train_iterator(self.train_ds, self.cfg, self.dp_rank, self.dp_size, self.state.consumed_samples)
        return tp_broadcast_iterator(source, self.pgs, t.micro_batch_size, t.seq_length, self.device)

    def evaluate(self) -> Optional[float]:
        if not self.has_valid:
            return None
        from nemotron_train.data import make_eval_iterator
        from nemotron_train.data.broadcast import tp_broadcast_iterator

        t = self.cfg.train
        source = make_eval_iterator(self.valid_ds, self.cfg, self.dp_rank, self.dp_size) if self.valid_ds is not None else None
        iterator = tp_broadcast_iterator(source, self.pgs, t.micro_batch_size, t.seq_length, self.device)
        num_micro = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        losses = [
            eval_step(self.model, iterator, self.pgs, self.device, t.seq_length, t.micro_batch_size, num_micro)
            for _ in range(t.eval_iters)
        ]
        return float(np.mean(losses))

    def train(self) -> Dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0:
            save_config(cfg, rundir.config_file(cfg.run.output_dir))
        from nemotron_train.training.stop import should_exit

        signals = self.signals
        start_time = time.time()
        self.metrics.start(self.state.step)
        first_step = self.state.step
        data_iter = self.guard.wrap_iterator(self._train_iterator())
        self.guard.start(self.state.step)
        last_val, stop_reason = None, None
        first_loss = last_loss = None
        while self.state.step < t.steps:
            update_num_microbatches(self.state.consumed_samples, consistency_check=True)
            gbs = get_current_global_batch_size()
            step_start = time.perf_counter()
            loss, grad_norm, _ = train_step(
                self.model, self.optimizer, self.scheduler, data_iter, self.pgs, self.device,
                t.seq_length, t.micro_batch_size, gbs, guard=self.guard,
            )
            if self.fp8_backend is not None:
                fp8_end_of_step(self.model, cfg, self.fp8_backend, amax_reduction_group(self.pgs))  # delayed scaling
            step_time = time.perf_counter() - step_start
            self.state.step += 1
            self.state.consumed_samples += gbs
            step = self.state.step
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            log = step % t.log_interval == 0 or step == t.steps or step == 1
            try:
                stragglers = self.guard.end_step(step, log, self.metrics)
            except BadStepError:
                self.checkpointer.finalize()  # an earlier step's async save still completes
                raise
            lr = self.optimizer.param_groups[0]["lr"]
            self.metrics.train_step(step, loss, lr, grad_norm, step_time, gbs * t.seq_length, log, stragglers)
            if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:
                last_val = self._validate(step)
            if self.cfg.checkpoint.interval and step % self.cfg.checkpoint.interval == 0 and step < t.steps:
                self._save()
            elif self.cfg.checkpoint.non_persistent_interval and step % self.cfg.checkpoint.non_persistent_interval == 0 and step < t.steps:
                self._save(non_persistent=True)
            self.checkpointer.maybe_finalize()
            self.manual_gc.step(step)
            self.cuda_graphs.after_step(step, first_step)
            # The last step ends the run: no exit-interval stop there, COMPLETED follows.
            stop_reason = should_exit(signals, start_time, t.exit_duration_minutes, group=None, step=step,
                                      exit_interval=t.exit_interval if step < t.steps else None)
            if stop_reason:
                break
        if stop_reason is None:
            last_val = self._validate(self.state.step)
        if self.cfg.checkpoint.save_at_end or stop_reason:
            self._save()
        self.checkpointer.finalize()
        self.manual_gc.close()
        self.guard.close()
        if self.run_lock is not None:
            self.run_lock.release()
        summary = {
            "steps": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "first_loss": first_loss,
            "final_loss": last_loss,
            "final_val_loss": last_val,
            "wall_time_s": round(time.time() - start_time, 2),
            "stopped_early": stop_reason,
        }
        self.metrics.close(summary)
        return summary

    def _save(self, non_persistent: bool = False) -> None:
        with params_synced(self.model):  # overlapped param gather: weights of the last step first
            self.checkpointer.save(self.model, self.optimizer, self.scheduler, self.state, non_persistent=non_persistent)

    def _validate(self, step: int) -> Optional[float]:
        with params_synced(self.model):
            val = self.evaluate()
        if val is not None:
            self.metrics.validation(step, val)
        return val


def run(resolved: ResolvedRun) -> Dict[str, Any]:
    return Trainer(resolved).train()
