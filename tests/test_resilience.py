"""Resilience units: drill-fault grammar and checks, the step guard on megatron-core's rerun
state machine (stop, skip, spikes, validate_results re-runs), straggler summary, watchdog."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemotron_train.config import load_config
from nemotron_train.config.resilience import Fault, check_resilience, parse_faults
from nemotron_train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _cfg(tmp_path, *overrides):
    return load_config(SMOKE, [f"run.output_dir={tmp_path / 'run'}", *overrides])


def test_fault_grammar():
    assert parse_faults(" nan_loss@5:1, inf_grad @ 9 : 0 ,") == [Fault("nan_loss", 5, 1), Fault("inf_grad", 9, 0)]
    assert parse_faults("") == []
    for bad in ("nan_loss@5", "bogus@5:1", "nan_loss@x:1"):
        with pytest.raises(ConfigError, match="KIND@STEP:RANK"):
            parse_faults(bad)


@pytest.mark.parametrize("override,match", [
    ("resilience.inject=nan_loss@5:2", "names rank 2 but the run has 2 ranks"),
    ("resilience.inject=nan_loss@0:1", "steps count from 1"),
    ("resilience.spike_factor=0.5", "spike_factor"),
    ("resilience.error_injection_rate=10", "rerun_mode=validate_results"),
    ("resilience.hang_timeout_s=-1", "hang_timeout_s"),
    ("launch.max_restarts=-1", "max_restarts"),
])
def test_bad_resilience_settings_are_named(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        check_resilience(_cfg(tmp_path, override), world_size=2)


def test_rerun_mode_choices_come_from_the_schema(tmp_path):
    with pytest.raises(ConfigError, match="validate_results"):
        _cfg(tmp_path, "resilience.rerun_mode=sometimes")


# --------------------------------------------------------------------------- the step guard


class Events:
    """The two MetricsLogger calls the guard makes."""

    def __init__(self):
        self.records, self.lines = [], []

    def event(self, record):
        self.records.append(record)

    def echo(self, text):
        self.lines.append(text)


@pytest.fixture
def cpu_platform():
    from nemotron_train.platform import setup_platform

    setup_platform(force_cpu=True)  # megatron-core's machine asks torch.cuda for the device


def _guard(tmp_path, *overrides):
    from nemotron_train.training.resilience import StepGuard

    guard = StepGuard(_cfg(tmp_path, "resilience.hang_timeout_s=0", *overrides), rank=0, world_size=1)
    guard.start(0)
    return guard, Events()


def _step(guard, loss: float, events: Events):
    """One step as train_step runs it: the machine's loop, the loss check, the agreement."""
    step = guard.step
    factor = guard.loss_factor()
    value = loss * factor if factor is not None else loss
    while guard.machine.should_run_forward_backward(None):
        guard.check_loss([{"lm loss": torch.tensor([value * 10.0, 10.0])}])
    discarded = guard.discard_update()
    guard.end_step(step, False, events)
    return discarded


def test_nan_loss_stops_with_step_rank_and_check(tmp_path, cpu_platform):
    from nemotron_train.training.resilience import BadStepError

    guard, events = _guard(tmp_path, "resilience.inject=nan_loss@3:0")
    assert not _step(guard, 6.0, events) and not _step(guard, 5.9, events)
    with pytest.raises(BadStepError, match=r"step 3 failed its checks: NaN loss on rank 0"):
        _step(guard, 5.8, events)
    assert events.records == [{"step": 3, "bad_step": True, "action": "stopped", "checks": {"nan_loss": [0]}}]
    # megatron-core's tracker file has the line, with the run's step number.
    log = (tmp_path / "run" / "bad_steps.log").read_text()
    assert "iteration=3 " in log and "found NaN in local forward loss calculation" in log


def test_skip_drops_bad_steps_and_stops_after_too_many_in_a_row(tmp_path, cpu_platform):
    from nemotron_train.training.resilience import BadStepError

    guard, events = _guard(
        tmp_path, "resilience.on_bad_step=skip", "resilience.max_skipped_steps=2",
        "resilience.inject=inf_loss@2:0,nan_loss@4:0,nan_loss@5:0,nan_loss@6:0",
    )
    results = [_step(guard, 6.0, events) for _ in range(5)]
    assert results == [False, True, False, True, True]
    assert [r["step"] for r in events.records] == [2, 4, 5] and events.records[0]["checks"] == {"inf_loss": [0]}
    assert all(r["action"] == "skipped" for r in events.records)
    with pytest.raises(BadStepError, match="3th step in a row to be skipped"):
        _step(guard, 6.0, events)


def test_spike_is_reported_after_the_window_and_not_fatal(tmp_path, cpu_platform):
    guard, events = _guard(tmp_path, "resilience.spike_window=2", "resilience.inject=spike_loss@3:0")
    # Threshold: 10 x the largest of the first 2 losses (6.0); step 3's 20 x 5.0 is over it.
    assert [_step(guard, loss, events) for loss in (6.0, 6.0, 5.0, 59.0)] == [False] * 4
    assert [(r["step"], r["action"], r["checks"]) for r in events.records] == [(3, "reported", {"spike_loss": [0]})]
    assert "loss spike on rank 0" in events.lines[0]


def test_spike_can_be_made_a_bad_step(tmp_path, cpu_platform):
    guard, events = _guard(tmp_path, "resilience.spike_window=1", "resilience.spike_action=bad_step",
                           "resilience.on_bad_step=skip", "resilience.inject=spike_loss@2:0")
    assert [_step(guard, 6.0, events) for _ in range(2)] == [False, True]


def test_scheduled_skip_consumes_the_batches(tmp_path, cpu_platform):
    guard, events = _guard(tmp_path, "resilience.skip_steps=[1]")
    batches = iter(range(10))
    assert guard.scheduled_skip(batches, 3) and next(batches) == 3
    guard.end_step(1, False, events)
    assert not guard.scheduled_skip(batches, 3)
    assert events.records[0]["action"] == "skipped" and not events.records[0]["bad_step"]


def test_validate_results_reruns_an_injected_error_in_place(tmp_path, cpu_platform):
    """megatron-core's own drill: every check rejected (rate 1), a transient error, which the
    in-place re-run does not reproduce."""
    from dist_utils import single_process_group

    with single_process_group(megatron=False):
        guard, events = _guard(tmp_path, "resilience.rerun_mode=validate_results", "resilience.error_injection_rate=1",
                               "resilience.on_bad_step=skip")
        runs = []

        def step(loss):
            count = 0
            while guard.machine.should_run_forward_backward(None):
                count += 1
                guard.check_loss([{"lm loss": torch.tensor([loss, 1.0])}])
            runs.append(count)
            discarded = guard.discard_update()
            guard.end_step(guard.step, False, events)
            return discarded

        assert not step(6.0)  # the machine validates nothing on a process's first step
        assert step(6.0)
    assert runs == [1, 2]
    record = events.records[0]
    assert record["checks"] == {"injected_error": [0]} and "transient" in record["diagnosis"]


def test_grad_fault_poisons_one_local_gradient(tmp_path, cpu_platform):
    guard, _ = _guard(tmp_path, "resilience.inject=inf_grad@1:0")
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p)
    seen = []
    guard.wrap_finalize(lambda chunks, *a: seen.append(chunks[0].weight.main_grad.clone()))([model], 7)
    assert math.isinf(seen[0].view(-1)[0]) and seen[0].view(-1)[1:].eq(0).all()


# --------------------------------------------------------------------------- stragglers


def test_straggler_summary_names_the_slowest_and_fastest_rank():
    from nemotron_train.training.resilience.stragglers import StepTimes, TimedIterator, format_report, summarise

    report = summarise([[0.10, 0.02, 0.01], [0.30, 0.02, 0.08], [0.09, 0.02, 0.01]])
    assert (report["slowest_rank"], report["fastest_rank"]) == (1, 2)
    assert report["straggler_ratio"] == pytest.approx(0.40 / 0.12)
    assert report["slowest_data_s"] == pytest.approx(0.08)
    assert format_report(report).startswith("slowest r1 400 ms (fb 300 / opt 20 / data 80), fastest r2 120 ms")

    times = StepTimes()

    def slow():
        time.sleep(0.02)
        yield 1

    next(TimedIterator(slow(), times))
    times.add(forward_backward_s=0.05, optimizer_s=0.01)
    fb, opt, data = times.take()
    assert data >= 0.02 and fb == pytest.approx(0.05 - data) and opt == 0.01
    assert times.take() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- hang watchdog

_WATCHDOG = """
import sys, time
from nemotron_train.training.resilience.watchdog import HangWatchdog
w = HangWatchdog(sys.argv[1], rank=0, world_size=2, timeout_s=1.0, poll_s=0.1)
w.start(7)
while True:  # the training thread keeps making progress; rank 1 does not
    w.beat(7)
    time.sleep(0.05)
"""


def test_watchdog_reports_a_frozen_peer_dumps_stacks_and_exits(tmp_path):
    run = tmp_path / "run"
    beats = run / "heartbeats"
    beats.mkdir(parents=True)
    old = time.time() - 0.5
    # Rank 1 beat once, then froze (on another host: not signalled from here).
    (beats / "rank1.json").write_text(json.dumps({
        "rank": 1, "pid": 1, "host": "elsewhere", "step": 6, "state": "training",
        "progress_time": old, "beat_time": old, "started": old,
    }))
    proc = subprocess.run([sys.executable, "-c", _WATCHDOG, str(run)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    from nemotron_train.training.resilience import EXIT_CODE_HANG

    assert proc.returncode == EXIT_CODE_HANG, proc.stderr
    report = json.loads((run / "stacks" / "hang.json").read_text())
    assert report["stuck"] == [1] and report["frozen"] == [1] and report["detected_by"] == 0
    assert "rank 1 made no progress" in proc.stderr and "stopped, frozen or gone" in proc.stderr
    dump = (run / "stacks" / "rank0.txt").read_text()
    assert "most recent call first" in dump and 'File "' in dump
    own = json.loads((beats / "rank0.json").read_text())
    assert own["step"] == 7 and own["state"] == "training" and own["host"] == socket.gethostname()
    # Rank 1 counts as idle from this watchdog's start: reported within the timeout and a poll or two.
    assert 1.0 <= report["time"] - own["started"] <= 1.0 + 0.3 + 0.5


# --------------------------------------------------------------------------- in-job restart


def test_batch_script_passes_max_restarts_to_torchrun(tmp_path):
    from launch.sbatch import render_job
    from launch.sbatch_script import SbatchOptions
    from nemotron_train.errors import LaunchError

    def render(mode, *overrides):
        opts = SbatchOptions(nodes=2, gpus_per_node=0, nproc_per_node=2, time="00:10:00", mode=mode, workdir=str(tmp_path))
        return render_job(SMOKE, [f"run.output_dir={tmp_path / 'run'}", *overrides], opts).script.read_text()

    assert render("per-node", "launch.max_restarts=2").count("--max-restarts=2") == 1
    assert "--max-restarts" not in render("per-node")
    with pytest.raises(LaunchError, match="launch.max_restarts needs torchrun"):
        render("per-gpu", "launch.max_restarts=1")


def test_watchdog_of_a_single_rank_reports_its_own_blocked_thread(tmp_path):
    script = ("import sys, time\nfrom nemotron_train.training.resilience.watchdog import HangWatchdog\n"
              "w = HangWatchdog(sys.argv[1], rank=0, world_size=1, timeout_s=0.5, poll_s=0.05)\nw.start(3)\ntime.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 18, proc.stderr
    report = json.loads((tmp_path / "stacks" / "hang.json").read_text())
    assert report["stuck"] == [0] and report["frozen"] == []
    assert "its training thread is blocked" in proc.stderr
    # The blocked main thread is in the dump, at the line it waits on.
    assert 'File "<string>", line 5 in <module>' in (tmp_path / "stacks" / "rank0.txt").read_text()
