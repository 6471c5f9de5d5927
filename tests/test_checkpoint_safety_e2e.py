"""Checkpoint safety end to end: a stop signal during setup, async save with a stop on an
interval step, a restart into an existing run directory, a schedule changed between runs,
RNG restore under another launch, and a short fault-injection campaign (bench/faults.py).

One run directory is carried through the first three tests (each continues the previous)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_e2e import ROOT, SHARED_DATA_CACHE, SHORT, SMOKE, _env, _free_port, train

pytestmark = pytest.mark.slow
ONE_RANK = ["parallel.tp=1", "parallel.sp=false", "launch.nproc_per_node=1", "scheduler.warmup_steps=0", "checkpoint.save_at_end=true"]


def _caught(pid: int, sig: signal.Signals) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (int(sig) - 1)))


def _records(out: Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("safety") / "run"


def test_a_stop_signal_during_setup_stops_at_the_first_step_with_an_async_save(run_dir):
    args = ["train", SMOKE, f"run.output_dir={run_dir}", f"launch.master_port={_free_port()}", *SHORT, *ONE_RANK,
            "train.steps=3", "checkpoint.interval=1", "checkpoint.async_save=true"]
    proc = subprocess.Popen([sys.executable, "-m", "nemotron_train", *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _caught(proc.pid, signal.SIGUSR1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # The handler is in place while the run is still being set up (nothing written yet).
    assert _caught(proc.pid, signal.SIGUSR1) and not (run_dir / "config.yaml").exists()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped_early"] == "signal SIGUSR1"
    # Step 1 was an interval step saved asynchronously; the stop's own save of it is the same one.
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]


def test_a_restart_without_resume_replaces_the_earlier_runs_checkpoints(run_dir):
    proc = train(run_dir, *ONE_RANK, "train.steps=2", "checkpoint.interval=1", "checkpoint.resume=false")
    assert "resumed from" not in proc.stderr
    assert "replacing iter_0000001" in proc.stderr  # said, not silent
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "2"
    saved = json.loads((ckpts / "iter_0000001" / "nemotron_train.json").read_text())
    assert saved["config"]["train"]["steps"] == 2  # this run's save of step 1, not the earlier run's
    assert [r["step"] for r in _records(run_dir) if "loss" in r] == [1, 2]  # one record per step


def test_a_longer_run_follows_the_config_schedule_and_restores_rng(run_dir):
    # Another master port (train() picks a free one): the ranks are the same, so RNG is restored.
    proc = train(run_dir, *ONE_RANK, "train.steps=4", "checkpoint.interval=1")
    assert "resumed from" in proc.stderr and "RNG state restored" in proc.stderr
    assert "schedule changed since the checkpoint: lr_decay_steps" in proc.stderr and "16 -> 32" in proc.stderr
    train_records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    # Cosine over 4 steps: step 3 is mid-decay, not the checkpoint schedule's minimum (3e-4).
    assert train_records[2]["lr"] > 1.5 * 3.0e-4


def test_a_short_fault_campaign_survives_every_kill(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/faults.py", "--kills", "2", "--kinds", "commit,prune", "--steps", "5", "--no-doc",
         "--no-rank-kill", "--no-disk-full", "--out", str(tmp_path), "--data-cache", SHARED_DATA_CACHE],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kills survived 2/2, losses identical: yes" in proc.stdout
