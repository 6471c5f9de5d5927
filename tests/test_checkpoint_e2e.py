"""Checkpoints end to end: exact resume, resharding across TP/PP/DP, crash safety, mismatches."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_e2e import ROOT, SMOKE, SHORT, _env, _free_port, assert_one_user_error_under_torchrun, losses, train

pytestmark = pytest.mark.slow
# Fixed schedule length so a shorter first leg has the same LR curve as the full run.
SIX = ["scheduler.decay_steps=6", "checkpoint.save_at_end=true", "checkpoint.keep_last=5"]
ONE_RANK = ["parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1"]
LAYOUTS = {
    "tp1": ONE_RANK,
    "tp2": ["parallel.tp=2", "parallel.sp=true", "launch.nproc_per_node=2"],
    "pp2": ["parallel.tp=1", "parallel.sp=false", "parallel.pp=2", "launch.nproc_per_node=2"],
    "dp2": ["parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=2"],
}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "straight"
    train(out, *ONE_RANK, *SIX, "train.steps=6")
    return out, losses(out)


@pytest.fixture(scope="module")
def straight(straight_run):
    return straight_run[1]


@pytest.fixture(scope="module")
def one_rank_first_leg(tmp_path_factory):
    """Steps 1-3 on one rank, checkpointed at 3: the first leg several tests continue (each
    from its own copy)."""
    out = tmp_path_factory.mktemp("ckpt") / "first_leg"
    train(out, *ONE_RANK, *SIX, "train.steps=3")
    return out


def _first_leg(out: Path, layout, shared: Path = None) -> None:
    if layout is ONE_RANK and shared is not None:
        shutil.copytree(shared, out)
    else:
        train(out, *layout, *SIX, "train.steps=3")
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def _two_legs(out: Path, first, second, shared_first_leg: Path = None):
    _first_leg(out, first, shared_first_leg)
    proc = train(out, *second, *SIX, "train.steps=6")
    assert "resumed from" in proc.stderr
    return losses(out)


def test_resume_is_exact(tmp_path, straight, one_rank_first_leg):
    got = _two_legs(tmp_path / "legs", ONE_RANK, ONE_RANK, one_rank_first_leg)
    assert got == straight  # bitwise: deterministic mode, same layout


@pytest.mark.parametrize("saved,resumed", [("tp2", "tp1"), ("pp2", "tp1"), ("dp2", "tp1"), ("tp1", "tp2"), ("tp1", "pp2")])
def test_resume_with_another_layout(tmp_path, straight, one_rank_first_leg, saved, resumed):
    got = _two_legs(tmp_path / f"{saved}_to_{resumed}", LAYOUTS[saved], LAYOUTS[resumed], one_rank_first_leg)
    assert len(got) == 6
    for step, (a, b) in enumerate(zip(got, straight), start=1):
        assert abs(a - b) <= 2e-4 * abs(b), f"step {step}: {a} vs {b}"


def _kill_inside_the_commit(args, staging, never_started: str) -> None:
    """Run `nemotron_train *args` with every save's commit held open, and SIGKILL its whole
    process group once the save being staged in `staging` has written its shards."""
    env = dict(_env(), NEMOTRON_TRAIN_SAVE_COMMIT_DELAY_S="60")
    proc = subprocess.Popen([sys.executable, "-m", "nemotron_train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (staging / ".metadata").exists():
        time.sleep(0.2)
    assert (staging / ".metadata").exists(), never_started
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, straight, one_rank_first_leg):
    out = tmp_path / "killed"
    _first_leg(out, ONE_RANK, one_rank_first_leg)
    ckpts = out / "checkpoints"
    # Second leg: hold the commit of the step-6 save open, and SIGKILL the run inside it.
    args = ["train", SMOKE, f"run.output_dir={out}", f"launch.master_port={_free_port()}", *SHORT, *ONE_RANK, *SIX, "train.steps=6"]
    _kill_inside_the_commit(args, ckpts / "iter_0000006.incomplete", "the save never started")
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (ckpts / "iter_0000003" / "nemotron_train.json").exists()
    assert not (ckpts / "iter_0000006").exists()
    # The next run resumes from step 3, says what it ignored, and ends where the straight run did.
    resumed = train(out, *ONE_RANK, *SIX, "train.steps=6")
    assert "iter_0000006.incomplete" in resumed.stderr and "resumed from" in resumed.stderr
    # metrics.jsonl holds one record per step: the killed run's steps 4-6 gave way to the resumed run's.
    assert "metrics: dropped" in resumed.stderr
    assert losses(out) == straight
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_checkpoint_of_another_model_is_refused(tmp_path, straight_run):
    out, _ = straight_run
    # Under torchrun (2 data-parallel ranks): one message from rank 0, exit code 2, no traceback.
    proc = train(out, "parallel.tp=1", "parallel.sp=false", *SIX, "train.steps=8", "model.hidden_size=96",
                 "model.mamba_head_dim=6", torchrun_nproc=2, expect_ok=False)
    assert proc.returncode != 0
    assert "model.hidden_size: checkpoint 64 vs config 96" in proc.stderr
    assert "model.mamba_head_dim" in proc.stderr
    assert_one_user_error_under_torchrun(proc, "model.hidden_size")


def test_async_save_commits_and_resumes_exactly(tmp_path, straight):
    out = tmp_path / "async"
    train(out, *ONE_RANK, *SIX, "train.steps=3", "checkpoint.async_save=true", "checkpoint.interval=2")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    train(out, *ONE_RANK, *SIX, "train.steps=6", "checkpoint.async_save=true")
    assert losses(out) == straight


def test_kill_after_non_persistent_save_resumes_from_it(tmp_path, straight):
    out = tmp_path / "non_persistent"
    ckpts, frequent = out / "checkpoints", out / "checkpoints_non_persistent"
    every2 = ["checkpoint.non_persistent_interval=2"]
    # Non-persistent saves at steps 2 and 4; the persistent save at the end (step 6) is held
    # open at its commit and the run SIGKILLed there, so step 4 is the newest complete one.
    args = ["train", SMOKE, f"run.output_dir={out}", f"launch.master_port={_free_port()}", *SHORT, *ONE_RANK, *SIX,
            "train.steps=6", *every2]
    _kill_inside_the_commit(args, ckpts / "iter_0000006.incomplete", "the final save never started")
    assert losses(out) == straight  # saving non-persistent checkpoints changes nothing
    assert not (ckpts / "latest_checkpointed_iteration.txt").exists()
    assert sorted(p.name for p in frequent.glob("iter_*")) == ["iter_0000004"]  # only the newest is kept
    assert (frequent / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    resumed = train(out, *ONE_RANK, *SIX, "train.steps=6", *every2)
    assert "resumed from" in resumed.stderr and "checkpoints_non_persistent/iter_0000004" in resumed.stderr
    last_by_step = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert [last_by_step[s] for s in range(1, 7)] == straight  # steps 5 and 6 as trained again
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
