"""Sharded, reshardable checkpoints: the `Checkpointer` (save, load, resume, async, prune)
and the `TrainState` it saves and restores.

The on-disk layout (iteration directories, tracker, metadata, the staged commit) is
layout.py's. A save writes into `iter_XXXXXXX.incomplete/`; only after every rank has
finished writing does rank 0 commit it (metadata, rename, tracker; all fsync'd). A crash at
any point leaves the previous checkpoint and tracker intact; the next run reports the
leftover `.incomplete` directory and resumes from the tracker.

How the state is cut, written and read is strategy.py's: every rank writes only its own
shard, optimizer state in model space (each rank's flat range as boxes of each parameter's
tensor), so a run can resume with different TP, PP or DP sizes; layer keys are global (see stack.py), so
PP changes work for Mamba layers too. The megatron-core 0.16 optimizer workarounds are in
mcore_fixes.py (`install_mcore_fixes()` is called at setup, not here).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from nemotron_train import rundir
from nemotron_train.checkpoint import layout, space, strategy
from nemotron_train.checkpoint.mcore_fixes import materialize_optimizer_state, unshare_step_tensors
from nemotron_train.checkpoint.trust import trust_notice
from nemotron_train.config.schema import Config, ModelConfig
from nemotron_train.errors import CheckpointError
from nemotron_train.models.vocab import vocab_rows_mismatch

# Model fields that must match for a checkpoint to load (the rest may change on resume).
# The padding divisor may change as long as the padded row count does (vocab_rows_mismatch).
ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)
               if f.name not in ("name", "spec", "init_method_std", "make_vocab_size_divisible_by")]


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run needs."""

    step: int = 0
    consumed_samples: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def _arch_value(model: Dict[str, Any], key: str) -> Any:
    # `|` stage boundaries are layout, not architecture: compare the layers themselves.
    value = model.get(key)
    return value.replace("|", "") if key == "pattern" and isinstance(value, str) else value


def check_architecture(saved: Dict[str, Any], current: ModelConfig, where: Path) -> None:
    now = dataclasses.asdict(current)
    mismatched = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {now[k]!r}"
        for k in ARCH_FIELDS
        if k in saved and _arch_value(saved, k) != _arch_value(now, k)
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {where} was saved for a different model; mismatched fields:\n  "
            + "\n  ".join(mismatched)
            + "\nUse a config matching the checkpoint, or point checkpoint.dir/run.output_dir elsewhere."
        )


def _rng_state() -> Dict[str, Any]:
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def rng_sharded_object(pgs) -> ShardedObject:
    """This rank's RNG states. They differ per rank, so they are keyed by (pp, tp, dp) rank
    and only a resume with the same shape restores them (`rng_restorable`)."""
    pp, tp, dp = pgs.pp, pgs.tp, pgs.dp
    return ShardedObject("rng_state", _rng_state(), (pp.size(), tp.size(), dp.size()), (pp.rank(), tp.rank(), dp.rank()), replica_id=0)


def restore_rng(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def rng_restorable(meta: Dict[str, Any], current: Dict[str, int]) -> bool:
    """Whether the checkpoint's per-rank RNG states fit this run: the same TP x PP x DP shape
    as recorded at save time. What the config's `launch` section says does not matter (a
    torchrun or SLURM launch has its own), only the ranks that really exist."""
    return meta.get("layout") == current


# Scheduler fields as megatron-core's OptimizerParamScheduler saves them (step counts in
# samples), with the config keys they come from.
_SCHEDULE_FIELDS = {
    "max_lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_steps": "scheduler.warmup_steps, in samples",
    "lr_decay_steps": "scheduler.decay_steps or train.steps, in samples",
    "lr_decay_style": "scheduler.type",
    "start_wd": "optimizer.weight_decay",
    "end_wd": "optimizer.weight_decay",
    "wd_incr_steps": "train.steps, in samples",
    "wd_incr_style": "weight decay style",
}


def schedule_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> list:
    """`name (config key) old -> new` for every schedule field the config changed since the save."""
    return [
        f"{name} ({key}) {saved[name]!r} -> {current[name]!r}"
        for name, key in _SCHEDULE_FIELDS.items()
        if name in saved and name in current and saved[name] != current[name]
    ]


def report_schedule_change(saved: Dict[str, Any], current: Dict[str, Any], cfg: Config) -> None:
    changes = schedule_changes(saved, current)
    if not changes:
        return
    if cfg.scheduler.use_checkpoint_schedule:
        action = "keeping the checkpoint's schedule (scheduler.use_checkpoint_schedule=true)"
    else:
        action = "following the config (scheduler.use_checkpoint_schedule=true keeps the checkpoint's)"
    print(f"schedule changed since the checkpoint: {'; '.join(changes)}; {action}", file=sys.stderr, flush=True)


class Checkpointer:
    def __init__(self, cfg: Config, pgs, is_logging_rank: bool):
        self.cfg = cfg
        self.pgs = pgs
        self.is_logging_rank = is_logging_rank
        self.root = rundir.checkpoint_dir(cfg.run.output_dir, cfg.checkpoint.dir)
        self.non_persistent_root = rundir.non_persistent_checkpoint_dir(cfg.run.output_dir, cfg.checkpoint.non_persistent_dir)
        self._queue = None
        self._saved_step: Optional[int] = None  # the step this process last saved (or scheduled)
        if is_logging_rank:  # under the run lock: nothing else writes here now
            for line in layout.recover(self.root):
                print(f"checkpoint: {line}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ state dicts

    def _rank_layout(self) -> Dict[str, int]:
        return {"tp": self.pgs.tp.size(), "pp": self.pgs.pp.size(), "dp": self.pgs.dp.size()}

    def _sharded_state_dict(self, model, optimizer, scheduler, state, is_loading: bool) -> Dict[str, Any]:
        model_sd = model.module.sharded_state_dict() if hasattr(model, "module") else model.sharded_state_dict()
        sd: Dict[str, Any] = {
            "model": model_sd,
            "optimizer": strategy.optimizer_sharded_state_dict(optimizer, model_sd, is_loading),
            "opt_param_scheduler": scheduler.state_dict(),
            "train_state": {"step": state.step, "consumed_samples": state.consumed_samples},
        }
        sd["rng_state"] = rng_sharded_object(self.pgs)
        return sd

    # ------------------------------------------------------------------ save

    def save(self, model, optimizer, scheduler, state, non_persistent: bool = False) -> Path:
        """Write shards into a staging directory; commit once every rank has finished.

        With `checkpoint.async_save` the shards are written by a background process while
        training continues, and the commit runs from `maybe_finalize()` on a later step.
        `non_persistent` saves go to `checkpoint.non_persistent_dir`, which keeps the newest only."""
        final = layout.iter_dir(self.non_persistent_root if non_persistent else self.root, state.step)
        if self._saved_step == state.step and not non_persistent:
            # Already saved (or, async, still saving) this step in this run: the interval and
            # the end coincide, or a stop signal arrived on an interval step. An iter_N/ from
            # an earlier run in this directory is not this run's: it is replaced at commit.
            return final
        self.maybe_finalize(blocking=True)  # one save in flight at a time
        if not non_persistent:  # a persistent save may follow a non-persistent one of the same step
            self._saved_step = state.step
        free_before = self._check_space(final)
        staging = layout.staging_dir(final)
        if self.is_logging_rank:
            layout.fresh_staging_dir(final)
        dist.barrier()
        materialize_optimizer_state(optimizer)  # a save before the first step needs it too
        sd = self._sharded_state_dict(model, optimizer, scheduler, state, is_loading=False)
        meta = layout.make_meta(state.step, state.consumed_samples, dataclasses.asdict(self.cfg), layout=self._rank_layout())
        commit = partial(self._commit, staging, meta, non_persistent)
        if self.cfg.checkpoint.async_save:
            request = strategy.save(sd, staging, self.pgs, async_save=True)
            request.add_finalize_fn(commit)
            self._async_queue().schedule_async_request(request)
        else:
            try:
                strategy.save(sd, staging, self.pgs, async_save=False)
            except Exception as exc:
                if not space.is_out_of_space(exc):
                    raise
                raise self._out_of_space(final, staging, free_before) from None
            dist.barrier()  # every rank has finished writing its shards
            commit()
            dist.barrier()
        return final

    def _check_space(self, final: Path) -> int:
        """Refuse a save that cannot fit, before writing anything; returns the free bytes.
        Rank 0 measures (the size of the newest complete checkpoint is the estimate) and
        every rank takes its answer, so all ranks stop together."""
        problem = None
        free = space.free_bytes(final.parent)
        if self.is_logging_rank:
            done = layout.complete_iterations(final.parent)
            problem = space.shortfall(final.parent, layout.iteration_of(final), space.tree_bytes(done[-1]) if done else None)
        flag = [str(problem) if problem else ""]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(flag, src=0)
        if flag[0]:
            raise CheckpointError(flag[0])
        return free

    def _out_of_space(self, final: Path, staging: Path, free_before: int) -> CheckpointError:
        """The disk filled during a sync save: drop the partial staging directory (rank 0)."""
        written = space.tree_bytes(staging)
        if self.is_logging_rank:
            shutil.rmtree(staging, ignore_errors=True)
        done = [p for p in layout.complete_iterations(final.parent) if p != final]
        needed = space.tree_bytes(done[-1]) if done else max(written, free_before) + 2**20
        return space.not_enough_space(final.parent, layout.iteration_of(final), needed, free_before, written)

    def _commit(self, staging: Path, meta: Dict[str, Any], non_persistent: bool = False) -> None:
        """Runs on every rank after all shards are on disk; rank 0 publishes the checkpoint."""
        if not self.is_logging_rank:
            return
        delay = float(os.environ.get("NEMOTRON_TRAIN_SAVE_COMMIT_DELAY_S", "0"))
        if delay and not non_persistent:  # fault-injection window for crash-safety tests
            time.sleep(delay)
        root = self.non_persistent_root if non_persistent else self.root
        if layout.is_iteration_dir(layout.iter_dir(root, int(meta["step"]))):
            print(f"replacing {layout.iter_dir_name(int(meta['step']))} in {root}: saved by an earlier run in this directory",
                  file=sys.stderr, flush=True)
        final = layout.commit(root, staging, meta)
        layout.prune(root, 1 if non_persistent else self.cfg.checkpoint.keep_last)
        print(f"saved checkpoint {final}", file=sys.stderr, flush=True)

    def _async_queue(self):
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        return self._queue

    def maybe_finalize(self, blocking: bool = False) -> None:
        """Commit finished async saves (call on every rank, every step)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def finalize(self) -> None:
        """Wait for outstanding saves and commit them."""
        self.maybe_finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        dist.barrier()

    # ------------------------------------------------------------------ load

    def find_resume_dir(self) -> Optional[Path]:
        # A run's own checkpoints win over `checkpoint.load` (the starting point), so a
        # restarted run continues instead of going back to where it started.
        own = self.cfg.checkpoint.resume and layout.has_tracker(self.root)
        root = Path(self.cfg.checkpoint.load) if self.cfg.checkpoint.load and not own else self.root
        if root != self.root and not root.exists():
            raise CheckpointError(f"checkpoint.load={root}: no such directory")
        incomplete = layout.incomplete_iterations(root)
        if incomplete and self.is_logging_rank:
            names = ", ".join(p.name for p in incomplete)
            print(f"warning: ignoring incomplete checkpoint(s) in {root}: {names} (an interrupted save)", file=sys.stderr)
        candidates = layout.resume_candidates(root)
        if not candidates:
            if self.cfg.checkpoint.load and root != self.root:
                raise CheckpointError(f"checkpoint.load={root}: no {layout.TRACKER}; is this a checkpoint directory?")
            return None
        problems = []
        for path in candidates:
            problem = layout.unreadable_reason(path) if layout.is_iteration_dir(path) else f"{path} is missing or incomplete"
            if problem is None:
                if problems and self.is_logging_rank:
                    print(f"warning: cannot resume from {candidates[0].name} ({problems[0]}); "
                          f"resuming from {path.name}, the newest readable checkpoint before it", file=sys.stderr, flush=True)
                if root != self.root and self.is_logging_rank:
                    trust_notice(path)
                return path
            problems.append(problem)
        raise CheckpointError(
            f"{layout.tracker_file(root)} names step {candidates[0].name}, which cannot be read ({problems[0]}), and no "
            f"complete checkpoint before it can be read either; restore it, or delete {layout.tracker_file(root)} to start "
            "over (this run's saves then replace the old iterations)"
        )

    def _resume_dir(self) -> Optional[Path]:
        """`find_resume_dir`, unless this run's newest non-persistent checkpoint is newer (or
        the run has no persistent one of its own yet): resume takes the newest complete one."""
        tracked = layout.read_tracker(self.non_persistent_root) if self.cfg.checkpoint.resume else None
        newest = layout.iter_dir(self.non_persistent_root, tracked) if tracked is not None else None
        if newest is None or not layout.is_iteration_dir(newest):
            return self.find_resume_dir()
        persistent = self.find_resume_dir() if layout.has_tracker(self.root) else None
        if persistent is not None and layout.iteration_of(persistent) >= tracked:
            return persistent
        return newest

    def _load_model_only(self, path: Path, model, optimizer):
        """A starting point without optimizer state (e.g. `import-hf`): weights only, step 0."""
        target = model.module if hasattr(model, "module") else model
        model_sd = {k: v for k, v in target.sharded_state_dict().items() if not k.endswith("_extra_state")}
        loaded = dist_checkpointing.load({"model": model_sd}, str(path))
        result = target.load_state_dict(loaded["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path}: weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        # The optimizer's fp32 master copies were made from the random init: refresh them.
        optimizer.reload_model_params()
        if self.is_logging_rank:
            print(f"initialised weights from {path} (model only; optimizer and schedule start fresh)", file=sys.stderr)
        return TrainState()

    def load_latest(self, model, optimizer, scheduler) -> Optional[TrainState]:
        if not self.cfg.checkpoint.resume and not self.cfg.checkpoint.load:
            return None
        path = self._resume_dir()
        if path is None:
            return None
        meta = layout.read_meta(path)
        check_architecture(meta["config"]["model"], self.cfg.model, path)
        rows_problem = vocab_rows_mismatch(meta["config"], self.cfg.model, self.cfg.parallel.tp)
        if rows_problem:
            raise CheckpointError(f"checkpoint {path}: {rows_problem}")
        if layout.is_model_only(meta):
            return self._load_model_only(path, model, optimizer)
        materialize_optimizer_state(optimizer)
        sd = self._sharded_state_dict(model, optimizer, scheduler, TrainState(), is_loading=True)
        if not rng_restorable(meta, self._rank_layout()):
            sd.pop("rng_state")  # other ranks (or a layout not recorded): the seed-derived state stands
        loaded = strategy.load(sd, path, self.pgs)
        target = model.module if hasattr(model, "module") else model
        target.load_state_dict(loaded["model"])
        strategy.load_optimizer_state(optimizer, loaded["optimizer"])
        unshare_step_tensors(optimizer)
        if self.is_logging_rank:
            report_schedule_change(loaded["opt_param_scheduler"], scheduler.state_dict(), self.cfg)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if "rng_state" in loaded:
            restore_rng(loaded["rng_state"])
        ts = loaded["train_state"]
        if path.parent == self.root:  # resumed from this run's own checkpoint of this step: no need to save it again
            self._saved_step = int(ts["step"])
        if self.is_logging_rank:
            rng = "RNG state restored" if "rng_state" in loaded else "RNG state from the seed (another or an unrecorded rank layout)"
            print(f"resumed from {path} at step {ts['step']} ({ts['consumed_samples']} samples consumed; {rng})", file=sys.stderr)
        return TrainState(step=int(ts["step"]), consumed_samples=int(ts["consumed_samples"]))
