"""Sharded, reshardable checkpoints: the `Checkpointer` (save, load, resume, async, prune)
and the `TrainState` it saves and restores.

The on-disk layout (iteration directories, tracker, metadata, the staged commit) is
layout.py's. A save writes into `iter_XXXXXXX.incomplete/`; only after every rank has
finished writing does rank 0 commit it (metadata, rename, tracker; all fsync'd). A crash at
any point leaves the previous checkpoint and tracker intact; the next run reports the
leftover `.incomplete` directory and resumes from the tracker.

Optimizer state is saved per parameter in model space (`fully_reshardable`), so a
run can resume with different TP, PP or DP sizes; layer keys are global (see stack.py), so
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
from nemotron_train.checkpoint import layout
from nemotron_train.checkpoint.mcore_fixes import materialize_optimizer_state, unshare_step_tensors
from nemotron_train.config.schema import Config, ModelConfig
from nemotron_train.errors import CheckpointError
from nemotron_train.models.vocab import vocab_rows_mismatch

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
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


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    def __init__(self, cfg: Config, pgs, is_logging_rank: bool):
        self.cfg = cfg
        self.pgs = pgs
        self.is_logging_rank = is_logging_rank
        self.root = rundir.checkpoint_dir(cfg.run.output_dir, cfg.checkpoint.dir)
        self._queue = None

    # ------------------------------------------------------------------ state dicts

    def _sharded_state_dict(self, model, optimizer, scheduler, state, is_loading: bool) -> Dict[str, Any]:
        model_sd = model.module.sharded_state_dict() if hasattr(model, "module") else model.sharded_state_dict()
        sd: Dict[str, Any] = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA),
            "opt_param_scheduler": scheduler.state_dict(),
            "train_state": {"step": state.step, "consumed_samples": state.consumed_samples},
        }
        # RNG states differ per rank; keyed by rank so a same-layout resume restores them.
        pp, tp, dp = self.pgs.pp, self.pgs.tp, self.pgs.dp
        sd["rng_state"] = ShardedObject(
            "rng_state",
            _rng_state(),
            (pp.size(), tp.size(), dp.size()),
            (pp.rank(), tp.rank(), dp.rank()),
            replica_id=0,
        )
        return sd

    # ------------------------------------------------------------------ save

    def save(self, model, optimizer, scheduler, state) -> Path:
        """Write shards into a staging directory; commit once every rank has finished.

        With `checkpoint.async_save` the shards are written by a background process while
        training continues, and the commit runs from `maybe_finalize()` on a later step."""
        final = layout.iter_dir(self.root, state.step)
        if final.exists():
            return final  # already saved this step (e.g. interval and end coincide)
        self.maybe_finalize(blocking=True)  # one save in flight at a time
        staging = layout.staging_dir(final)
        if self.is_logging_rank:
            layout.fresh_staging_dir(final)
        dist.barrier()
        materialize_optimizer_state(optimizer)  # a save before the first step needs it too
        sd = self._sharded_state_dict(model, optimizer, scheduler, state, is_loading=False)
        meta = layout.make_meta(state.step, state.consumed_samples, dataclasses.asdict(self.cfg))
        commit = partial(self._commit, staging, meta)
        if self.cfg.checkpoint.async_save:
            request = dist_checkpointing.save(sd, str(staging), async_sharded_save=True)
            request.add_finalize_fn(commit)
            self._async_queue().schedule_async_request(request)
        else:
            dist_checkpointing.save(sd, str(staging))
            dist.barrier()  # every rank has finished writing its shards
            commit()
            dist.barrier()
        return final

    def _commit(self, staging: Path, meta: Dict[str, Any]) -> None:
        """Runs on every rank after all shards are on disk; rank 0 publishes the checkpoint."""
        if not self.is_logging_rank:
            return
        delay = float(os.environ.get("NEMOTRON_TRAIN_SAVE_COMMIT_DELAY_S", "0"))
        if delay:  # fault-injection window for crash-safety tests
            time.sleep(delay)
        final = layout.commit(self.root, staging, meta)
        self._prune()
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

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        done = layout.complete_iterations(self.root)
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

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
        step = layout.read_tracker(root)
        if step is None:
            if self.cfg.checkpoint.load and root != self.root:
                raise CheckpointError(f"checkpoint.load={root}: no {layout.TRACKER}; is this a checkpoint directory?")
            return None
        path = layout.iter_dir(root, step)
        if not layout.is_iteration_dir(path):
            raise CheckpointError(
                f"{layout.tracker_file(root)} points to {path}, which is missing or incomplete; restore it or delete the tracker"
            )
        return path

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
        path = self.find_resume_dir()
        if path is None:
            return None
        meta = layout.read_meta(path)
        check_architecture(meta["config"]["model"], self.cfg.model, path)
        rows_problem = vocab_rows_mismatch(meta["config"], self.cfg.model, self.cfg.parallel.tp)
        if rows_problem:
            raise CheckpointError(f"checkpoint {path}: {rows_problem}")
        if layout.is_model_only(meta):
            return self._load_model_only(path, model, optimizer)
        saved_par = meta["config"]["parallel"]
        same_layout = saved_par["tp"] == self.cfg.parallel.tp and saved_par["pp"] == self.cfg.parallel.pp
        materialize_optimizer_state(optimizer)
        sd = self._sharded_state_dict(model, optimizer, scheduler, TrainState(), is_loading=True)
        if not same_layout or meta["config"]["launch"] != dataclasses.asdict(self.cfg.launch):
            sd.pop("rng_state")  # another layout has other ranks; the seed-derived state stands
        loaded = dist_checkpointing.load(sd, str(path))
        target = model.module if hasattr(model, "module") else model
        target.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_step_tensors(optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if "rng_state" in loaded:
            _set_rng_state(loaded["rng_state"])
        ts = loaded["train_state"]
        if self.is_logging_rank:
            print(f"resumed from {path} at step {ts['step']} ({ts['consumed_samples']} samples consumed)", file=sys.stderr)
        return TrainState(step=int(ts["step"]), consumed_samples=int(ts["consumed_samples"]))
