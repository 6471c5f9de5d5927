"""Graceful stop: signal receipt, agreement across ranks, exit codes and the COMPLETED marker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nemotron_train.training.stop import (
    EXIT_CODE_DONE,
    EXIT_CODE_RESUMABLE,
    ExitSignalHandler,
    clear_completed,
    completed_steps,
    exit_signal_names,
    is_completed,
    job_exit_code,
    mark_completed,
    resumable_exit_code,
    should_exit,
    signal_name,
)

ROOT = Path(__file__).resolve().parents[1]


def test_signal_names_are_canonical():
    assert signal_name("usr1") == signal_name("SIGUSR1") == "SIGUSR1"
    assert exit_signal_names() == ("SIGTERM", "SIGUSR1")
    assert exit_signal_names("SIGUSR2") == ("SIGTERM", "SIGUSR1", "SIGUSR2")
    assert exit_signal_names("SIGTERM") == ("SIGTERM", "SIGUSR1")
    with pytest.raises(ValueError, match="unknown signal 'SIGBOGUS'"):
        signal_name("SIGBOGUS")


def test_handler_records_signals_instead_of_dying():
    before = signal.getsignal(signal.SIGUSR1)
    handler = ExitSignalHandler(("SIGTERM", "usr1", "SIGTERM"))  # duplicates collapse
    try:
        assert handler.installed and handler.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs handlers between bytecodes; give it a few
        assert handler.received == "SIGUSR1"
        assert handler.received_signals == ["SIGUSR1", "SIGTERM"]
        handler.reset()
        assert handler.received is None
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_handler_as_context_manager_and_lazy_install():
    handler = ExitSignalHandler(("SIGUSR2",), install=False)
    assert not handler.installed
    with handler:
        assert handler.installed
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
    assert not handler.installed and handler.received == "SIGUSR2"


def test_handler_only_from_the_main_thread():
    errors = []

    def worker():
        try:
            ExitSignalHandler()
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def test_should_exit_single_process():
    handler = ExitSignalHandler(("SIGUSR1",))
    try:
        now = time.time()
        assert should_exit(handler, now, None) is None
        assert should_exit(handler, now, 5.0) is None
        assert should_exit(handler, now - 61, 1.0) == "time limit"
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert should_exit(handler, now, None) == "signal SIGUSR1"
        # A signal wins over the time limit: it is the more specific reason.
        assert should_exit(handler, now - 61, 1.0) == "signal SIGUSR1"
    finally:
        handler.restore()
    assert should_exit(None, time.time() - 120, 1.0) == "time limit"
    with pytest.raises(ValueError, match="exit_duration_minutes=0"):
        should_exit(None, time.time(), 0)


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from nemotron_train.training.stop import ExitSignalHandler, should_exit, resumable_exit_code
    handler = ExitSignalHandler()
    print("ready", flush=True)
    start = time.time()
    for step in range(1, 400):
        time.sleep(0.05)
        reason = should_exit(handler, start, None)
        if reason:
            print(f"stopped at step {step}: {reason}", flush=True)
            sys.exit(resumable_exit_code())
    sys.exit(1)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_real_signal_stops_a_process_gracefully(sig):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_CODE_RESUMABLE
    assert f"signal {sig.name}" in out


_EXITING = textwrap.dedent(
    """
    import atexit, os, signal, sys, time
    def late_signal():  # registered first, so it runs after the handler's own exit hook
        print("at exit:", signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
    atexit.register(late_signal)
    from nemotron_train.training.stop import ExitSignalHandler
    handler = ExitSignalHandler()
    sys.exit(0)
    """
)


def test_a_stop_signal_during_exit_does_not_kill_the_process():
    result = subprocess.run([sys.executable, "-c", _EXITING], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "at exit: True"


def test_resumable_exit_code_under_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert resumable_exit_code() == EXIT_CODE_RESUMABLE == 75
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "123")
    assert resumable_exit_code() == EXIT_CODE_DONE == 0


def test_completed_marker(tmp_path):
    run = tmp_path / "run"
    assert not is_completed(run) and completed_steps(run) is None
    path = mark_completed(run, steps=60)
    assert path == run / "COMPLETED" and path.read_text().splitlines()[0] == "60"
    assert is_completed(run) and is_completed(run, steps=60) and completed_steps(run) == 60
    assert not is_completed(run, steps=120)  # the run was extended: not done any more
    mark_completed(run)  # no step count: done for any target
    assert is_completed(run, steps=10**9)
    clear_completed(run)
    assert not is_completed(run)
    clear_completed(run)  # idempotent


def test_job_exit_code(tmp_path):
    assert job_exit_code(0, tmp_path) == EXIT_CODE_RESUMABLE  # clean exit, run not done
    assert job_exit_code(75, tmp_path) == EXIT_CODE_RESUMABLE
    assert job_exit_code(1, tmp_path) == 1
    mark_completed(tmp_path, 5)
    assert job_exit_code(0, tmp_path) == EXIT_CODE_DONE
    assert job_exit_code(0, tmp_path, steps=10) == EXIT_CODE_RESUMABLE


# --------------------------------------------------------------------------- two ranks (gloo)

_RANK = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch.distributed as dist
    from nemotron_train.training.stop import ExitSignalHandler, should_exit
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handler = ExitSignalHandler()
    mode = sys.argv[1]
    # Only rank 1 sees the stop: its signal (or its clock) must stop both ranks at one step.
    start = time.time() - (600 if (mode == "time" and rank == 1) else 0)
    limit = 5.0 if mode == "time" else None
    result = None
    for step in range(1, 50):
        if mode == "signal" and rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        reason = should_exit(handler, start, limit)
        if reason:
            result = {"rank": rank, "step": step, "reason": reason, "local": handler.received}
            break
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(mode: str) -> list:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
def test_ranks_agree_on_a_signal_one_rank_received():
    r0, r1 = _run_two_ranks("signal")
    assert r0["step"] == r1["step"] == 3
    assert r0["reason"] == r1["reason"] == "signal SIGUSR1"
    assert (r0["local"], r1["local"]) == (None, "SIGUSR1")  # rank 0 stopped only by agreement


@pytest.mark.slow
def test_ranks_agree_on_a_time_limit_one_rank_reached():
    r0, r1 = _run_two_ranks("time")
    assert r0["step"] == r1["step"] == 1
    assert r0["reason"] == r1["reason"] == "time limit"
