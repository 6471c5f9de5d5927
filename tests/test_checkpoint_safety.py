"""Checkpoint safety without training: replacing an earlier run's iteration, prune order,
resume fallback, the run lock, RNG restore, schedule changes, metrics repair, the trust
notice and the stop handler installed before setup."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nemotron_train.checkpoint import layout
from nemotron_train.errors import CheckpointError, UserError


def _save(root, step, payload="weights"):
    staging = layout.fresh_staging_dir(layout.iter_dir(root, step))
    (staging / "shard.distcp").write_text(payload)
    return layout.commit(root, staging, layout.make_meta(step, 8 * step, {"model": {}}))


def _steps(root):
    return [layout.iteration_of(p) for p in layout.complete_iterations(root)]


# ---------------------------------------------------------------- restart into an existing run directory


def test_a_new_run_replaces_an_earlier_runs_iteration_of_the_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2, "old run")
    _save(root, 4, "old run")
    # A restart with checkpoint.resume=false saves step 2 again: its save is published and tracked.
    _save(root, 2, "new run")
    assert (root / "iter_0000002" / "shard.distcp").read_text() == "new run"
    assert layout.read_tracker(root) == 2
    assert not list(root.glob("*.replaced")) and not list(root.glob("*.incomplete"))


def test_recover_puts_back_an_iteration_whose_replacement_was_interrupted(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    # A kill between moving the old copy aside and publishing the new one:
    os.replace(root / "iter_0000002", root / "iter_0000002.replaced")
    assert "restored iter_0000002" in layout.recover(root)[0]
    assert _steps(root) == [2] and layout.unreadable_reason(root / "iter_0000002") is not None  # fake shards
    # A kill after the new copy was published: the old one is just deleted.
    (root / "iter_0000002.replaced").mkdir()
    (root / "iter_0000004.pruning").mkdir()
    assert len(layout.recover(root)) == 2
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


# ---------------------------------------------------------------- prune


def test_prune_orders_by_step_and_keeps_the_tracked_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (9_999_999, 10_000_000, 10_000_001):  # names gain a digit: name order != step order
        _save(root, step)
    assert [p.name for p in layout.prune(root, 2)] == ["iter_9999999"]
    assert _steps(root) == [10_000_000, 10_000_001]


def test_prune_after_a_tracker_rewind_never_deletes_the_checkpoint_just_committed(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 6, 8):
        _save(root, step)
    layout.write_tracker(root, 4)  # the run resumed from step 4 (e.g. the tracker was rolled back)
    _save(root, 5)  # the resumed run's next save
    layout.prune(root, 1)
    assert layout.read_tracker(root) == 5
    assert 5 in _steps(root) and 4 not in _steps(root)
    assert {6, 8} <= set(_steps(root))  # later steps of the earlier run: replaced when this run gets there
    assert not list(root.glob("*.pruning"))


# ---------------------------------------------------------------- resume choice


def _dcp_checkpoint(root, step):
    import torch.distributed.checkpoint as dcp

    staging = layout.fresh_staging_dir(layout.iter_dir(root, step))
    dcp.save({"w": torch.full((256,), float(step))}, checkpoint_id=str(staging), no_dist=True)
    return layout.commit(root, staging, layout.make_meta(step, 8 * step, {"model": {}}))


def _checkpointer(tmp_path, *overrides):
    from nemotron_train.checkpoint.manager import Checkpointer
    from nemotron_train.config import load_config

    cfg = load_config(str(_SMOKE), [f"run.output_dir={tmp_path / 'run'}", *overrides])
    return Checkpointer(cfg, None, is_logging_rank=True)


_SMOKE = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, capsys):
    ckpt = _checkpointer(tmp_path)
    for step in (2, 4, 6):
        _dcp_checkpoint(ckpt.root, step)
    assert ckpt.find_resume_dir() == ckpt.root / "iter_0000006"
    shard = next((ckpt.root / "iter_0000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a shard cut short
    (ckpt.root / "iter_0000004" / ".metadata").unlink()
    assert ckpt.find_resume_dir() == ckpt.root / "iter_0000002"
    err = capsys.readouterr().err
    assert "cannot resume from iter_0000006" in err and "truncated" in err and "iter_0000002" in err
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(ckpt.root / "iter_0000002")
    with pytest.raises(CheckpointError, match="no\ncomplete|no complete checkpoint before it"):
        ckpt.find_resume_dir()


def test_checkpoint_load_of_a_foreign_directory_gives_the_trust_notice_once(tmp_path, capsys):
    from nemotron_train.checkpoint import trust

    other = tmp_path / "elsewhere"
    _dcp_checkpoint(other, 3)
    ckpt = _checkpointer(tmp_path, f"checkpoint.load={other}")
    trust._NOTICED.clear()
    assert ckpt.find_resume_dir() == other / "iter_0000003"
    assert ckpt.find_resume_dir() == other / "iter_0000003"
    assert capsys.readouterr().err.count("unpickles data") == 1
    # The run's own checkpoints need no notice.
    trust._NOTICED.clear()
    own = _checkpointer(tmp_path / "own")
    _dcp_checkpoint(own.root, 1)
    assert own.find_resume_dir() == own.root / "iter_0000001"
    assert "unpickles" not in capsys.readouterr().err


# ---------------------------------------------------------------- RNG state


def test_rng_restore_is_decided_by_the_rank_layout_not_the_launch_section():
    from nemotron_train.checkpoint.manager import rng_restorable

    here = {"tp": 1, "pp": 1, "dp": 2}
    meta = {"layout": dict(here), "config": {"launch": {"master_port": 29500, "nproc_per_node": 2}}}
    assert rng_restorable(meta, here)  # another master_port or launcher: same ranks
    assert not rng_restorable(meta, {"tp": 1, "pp": 1, "dp": 4})  # other ranks
    assert not rng_restorable({"config": {}}, here)  # layout not recorded: keep the seed's state


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np
    from megatron.core import dist_checkpointing
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_utils import single_process_group
    from nemotron_train.checkpoint.manager import restore_rng, rng_sharded_object
    from nemotron_train.platform import setup_platform

    setup_platform()  # megatron-core's CPU redirections (its async writer syncs CUDA otherwise)
    with single_process_group():
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        torch.rand(3)
        dist_checkpointing.save({"rng_state": rng_sharded_object(pgs)}, str(tmp_path))
        expected = (torch.rand(4), random.random(), np.random.rand())
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        loaded = dist_checkpointing.load({"rng_state": rng_sharded_object(pgs)}, str(tmp_path))
        restore_rng(loaded["rng_state"])
        got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ---------------------------------------------------------------- schedule changes


def test_schedule_changes_name_each_field_old_and_new():
    from nemotron_train.checkpoint.manager import schedule_changes

    saved = {"max_lr": 3e-3, "lr_decay_steps": 32, "lr_decay_style": "cosine", "num_steps": 32}
    now = {"max_lr": 3e-3, "lr_decay_steps": 64, "lr_decay_style": "cosine", "num_steps": 0}
    assert schedule_changes(saved, now) == ["lr_decay_steps (scheduler.decay_steps or train.steps, in samples) 32 -> 64"]
    assert schedule_changes(saved, dict(saved)) == []


def test_the_scheduler_follows_the_config_unless_told_to_keep_the_checkpoints(tmp_path):
    from nemotron_train.config import load_config
    from nemotron_train.training.optim import build_scheduler

    class Opt:  # OptimizerParamScheduler only sets lr / weight_decay on the param groups
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    def scheduler(*overrides):
        cfg = load_config(str(_SMOKE), ["scheduler.warmup_steps=0", "train.global_batch_size=8", *overrides])
        return build_scheduler(cfg, Opt())

    saved = scheduler("train.steps=4")
    for _ in range(4):
        saved.step(8)
    state = saved.state_dict()
    longer = scheduler("train.steps=8")
    longer.load_state_dict(state)
    assert longer.lr_decay_steps == 64 and longer.get_lr({"lr_mult": 1.0}) > 1e-3  # mid-cosine, not min_lr
    kept = scheduler("train.steps=8", "scheduler.use_checkpoint_schedule=true")
    kept.load_state_dict(state)
    assert kept.lr_decay_steps == 32


# ---------------------------------------------------------------- run lock


_HOLD = """
import sys, time
from nemotron_train.checkpoint.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_one_directory_is_refused_naming_the_holder(tmp_path):
    from nemotron_train.checkpoint.lock import RunLock, RunLockedError

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        assert isinstance(info.value, UserError)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "host " in message and "run.output_dir" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing (SIGKILL): its lock is taken over, and said so.
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over is not None and f"pid {holder.pid}" in lock.took_over
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    again = RunLock(tmp_path).acquire()
    assert again.took_over is None  # a clean release leaves nothing to take over
    again.release()


# ---------------------------------------------------------------- metrics.jsonl


def test_resumed_metrics_keep_one_record_per_step(tmp_path):
    from nemotron_train.ablation.metrics import read_run
    from nemotron_train.training.metrics import trim_metrics

    path = tmp_path / "metrics.jsonl"
    killed = [json.dumps({"step": s, "loss": 10.0 + s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(killed) + '\n{"step": 5, "lo')  # killed mid-write after step 4
    # The run resumes from its step-2 checkpoint: steps 3-4 are trained again, the torn line goes.
    assert trim_metrics(path, 2) == 3
    with open(path, "a") as f:
        for s in (3, 4, 5):
            f.write(json.dumps({"step": s, "loss": 1.0 + s}) + "\n")
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 11.0), (2, 12.0), (3, 4.0), (4, 5.0), (5, 6.0)]
    # A file written before the trim existed: a torn line continued by the resumed run.
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("\n".join(killed) + '\n{"step": 5, "lo' + json.dumps({"step": 3, "loss": 4.0}) + "\n")
    run = read_run(old)
    assert [(r["step"], r["loss"]) for r in run.train] == [(1, 11.0), (2, 12.0), (3, 4.0), (4, 14.0)]


# ---------------------------------------------------------------- stop signals during setup


def test_the_stop_handler_is_one_per_process_and_grows_with_exit_signal():
    from nemotron_train.training import stop

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop._STOP_HANDLER = None
        early = stop.install_stop_handler()
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives during "setup"
        time.sleep(0.05)
        later = stop.install_stop_handler("SIGUSR2")
        assert later is early and later.received == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR2) == early._record
        assert stop.should_exit(later, time.time(), None) == "signal SIGUSR1"
    finally:
        stop._STOP_HANDLER = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
