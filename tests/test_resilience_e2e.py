"""Resilience drills on the 2-rank smoke model (data parallel, so each rank has its own loss).

One run per scenario, shared by its assertions:
- stop:      a NaN loss on rank 1 at step 5, on_bad_step=stop;
- drill:     20 seeded faults of every kind on both ranks, on_bad_step=skip;
- reference: the drill's config without its NaN/Inf faults, their steps in skip_steps;
- restart:   the drill's config with launch.max_restarts=1, one worker SIGKILLed mid-run;
- hang:      one rank SIGSTOPped mid-run, hang_timeout_s=3.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_train_e2e import SHARED_DATA_CACHE, SMOKE, _env, _free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    f"data.cache_dir={SHARED_DATA_CACHE}",
    "parallel.tp=1",
    "parallel.sp=false",
    "launch.nproc_per_node=2",
    "train.seq_length=64",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.eval_iters=1",
    "logging.progress_bar=false",
]
DRILL_STEPS = 26
KINDS = ("nan_loss", "inf_loss", "spike_loss", "nan_grad", "inf_grad")


def _faults():
    """A NaN loss on rank 1 at step 5 and 19 seeded faults of every kind on both ranks, one per
    step from step 4 (the spike threshold is learnt on steps 1-3)."""
    rng = random.Random(15)
    steps = rng.sample([s for s in range(4, DRILL_STEPS + 1) if s != 5], 19)
    return sorted([("nan_loss", 5, 1)] + [(rng.choice(KINDS), step, rng.randrange(2)) for step in steps], key=lambda f: f[1])


FAULTS = _faults()
DRILL = BASE + [
    f"train.steps={DRILL_STEPS}",
    "checkpoint.interval=6",
    "resilience.on_bad_step=skip",
    "resilience.max_skipped_steps=30",
    "resilience.spike_window=3",
]


def _inject(faults):
    return "resilience.inject=" + ",".join(f"{k}@{s}:{r}" for k, s, r in faults)


def _cmd(out: Path, overrides):
    return [sys.executable, "-m", "nemotron_train", "train", SMOKE, f"run.output_dir={out}",
            f"launch.master_port={_free_port()}", *overrides]


def _run(out: Path, *overrides, timeout=240):
    proc = subprocess.run(_cmd(out, overrides), capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    return proc


def _records(out: Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _step_losses(out: Path):
    """Loss of every step; a step logged twice (before and after a restart) keeps its last value."""
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


def _events(out: Path):
    return {r["step"]: r for r in _records(out) if "action" in r}


def _tensors(checkpoint: Path, tmp: Path):
    dcp_to_torch_save(checkpoint, tmp)
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v

    walk(torch.load(tmp, weights_only=False))
    return flat


def _start(out: Path, *overrides):
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(_cmd(out, overrides), stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=ROOT, start_new_session=True)  # a process group: torchrun and its workers
    return proc, out.parent / f"{out.name}.log"


def _wait_for_step(out: Path, step: int, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before step {step}"
        try:
            if any(r.get("step", 0) >= step for r in _records(out) if "loss" in r):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def _pid_of_rank(out: Path, rank: int) -> int:
    return json.loads((out / "heartbeats" / f"rank{rank}.json").read_text())["pid"]


def _end(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("resilience")


@pytest.fixture(scope="module")
def stop_run(runs):
    out = runs / "stop"
    proc = _run(out, *BASE, "train.steps=8", "checkpoint.interval=2", "resilience.inject=nan_loss@5:1")
    return out, proc


@pytest.fixture(scope="module")
def drill_run(runs):
    out = runs / "drill"
    proc = _run(out, *DRILL, _inject(FAULTS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def reference_run(runs):
    out = runs / "reference"
    bad = [s for k, s, _ in FAULTS if k != "spike_loss"]
    proc = _run(out, *DRILL, _inject([f for f in FAULTS if f[0] == "spike_loss"]),
                f"resilience.skip_steps=[{','.join(map(str, bad))}]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_nan_loss_with_stop_names_step_rank_and_check(stop_run):
    out, proc = stop_run
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "error: step 5 failed its checks: NaN loss on rank 1" in text
    assert "Implicit initialization of Rerun State Machine" not in text
    # Nothing from step 5 was saved: the step-4 checkpoint is the resume point.
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    event = _events(out)[5]
    assert event["action"] == "stopped" and event["checks"]["nan_loss"] == [1]
    assert not (out / "COMPLETED").exists()


@pytest.mark.slow
def test_seeded_drill_detects_every_fault_with_its_rank(drill_run):
    out, proc = drill_run
    events = _events(out)
    for kind, step, rank in FAULTS:
        assert step in events, f"{kind}@{step}:{rank} not detected"
        ranks = events[step]["checks"].get(kind, [])
        assert ranks == [rank], f"{kind}@{step}:{rank}: found {events[step]['checks']}"
        assert events[step]["action"] == ("reported" if kind == "spike_loss" else "skipped")
    assert set(events) == {s for _, s, _ in FAULTS}  # no false alarm
    assert len(FAULTS) >= 20 and {k for k, _, _ in FAULTS} == set(KINDS) and {r for *_, r in FAULTS} == {0, 1}
    assert "skipped: NaN gradient on rank" in proc.stdout
    # The straggler report is in every step record.
    last = [r for r in _records(out) if "loss" in r][-1]
    assert last["straggler_ratio"] >= 1.0 and {last["slowest_rank"], last["fastest_rank"]} <= {0, 1}


@pytest.mark.slow
def test_skipped_steps_leave_no_trace(drill_run, reference_run, tmp_path):
    """The drill's final weights and optimizer state equal a run whose bad steps' batches were
    never applied (Megatron's iterations-to-skip)."""
    out, _ = drill_run
    got, want = _step_losses(out), _step_losses(reference_run)
    assert got.keys() == want.keys() == set(range(1, DRILL_STEPS + 1))
    skipped = {s for k, s, _ in FAULTS if k != "spike_loss"}
    assert all(got[step] == want[step] for step in got if step not in skipped)
    final = f"checkpoints/iter_{DRILL_STEPS:07d}"
    a, b = _tensors(out / final, tmp_path / "a.pt"), _tensors(reference_run / final, tmp_path / "b.pt")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_and_resumes_exactly(runs, drill_run):
    out = runs / "restart"
    proc, log = _start(out, *DRILL, _inject(FAULTS), "launch.max_restarts=1")
    _wait_for_step(out, 8, proc)  # the step-6 checkpoint exists
    os.kill(_pid_of_rank(out, 1), signal.SIGKILL)
    assert _end(proc, 240) == 0, log.read_text()[-4000:]
    # The restarted group resumed from the checkpoint (and trimmed the steps it trains again
    # from metrics.jsonl, so each step has one record, the resumed run's).
    assert "resumed from" in log.read_text(), "the worker group was not restarted"
    records = [r["step"] for r in _records(out) if "loss" in r]
    assert len(records) == len(set(records))
    want = _step_losses(drill_run[0])
    got = _step_losses(out)
    assert got.keys() == want.keys()
    for step in got:
        assert (math.isnan(got[step]) and math.isnan(want[step])) or got[step] == want[step], step
    assert (out / "COMPLETED").exists()


@pytest.mark.slow
def test_stopped_rank_is_reported_with_stack_dumps(runs):
    out = runs / "hang"
    timeout_s = 3.0
    proc, log = _start(out, *BASE, "train.steps=100000", "checkpoint.save_at_end=false",
                       f"resilience.hang_timeout_s={timeout_s}")
    _wait_for_step(out, 3, proc)
    stopped = time.time()
    os.kill(_pid_of_rank(out, 1), signal.SIGSTOP)
    code = _end(proc, 60)
    text = log.read_text()
    assert code != 0
    report = json.loads((out / "stacks" / "hang.json").read_text())
    assert report["stuck"] == [1] and report["frozen"] == [1]
    step_s = max(r["step_time_s"] for r in _records(out) if "loss" in r)
    poll = timeout_s / 10
    assert report["time"] - stopped <= timeout_s + step_s + 2 * poll + 0.5
    assert "hang detected" in text and "rank 1 made no progress" in text
    for rank in (0, 1):
        dump = (out / "stacks" / f"rank{rank}.txt").read_text()
        assert "most recent call first" in dump and 'File "' in dump, dump
