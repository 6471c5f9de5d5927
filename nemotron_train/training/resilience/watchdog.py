"""Hang detection: a heartbeat file per rank and a watchdog thread in every rank.

The training loop marks progress after each step (`beat`, an in-memory write). A daemon
thread in each rank writes that progress into `<run>/heartbeats/rank<R>.json` every poll
(timeout/10, at most 5 s) and reads the file of the next rank (R+1 mod world): each rank
is watched by one other, one small read per poll. A rank is stuck when its last progress
is older than `resilience.hang_timeout_s`. Its heartbeat file tells two cases apart: still
written (the process runs; its main thread is blocked, e.g. in a collective or a loop) or
not written either (the process is stopped, frozen or gone).

The rank that sees it writes `<run>/stacks/hang.json` (first writer wins) naming the stuck
rank(s), signals the stuck processes on its host with DUMP_SIGNAL (faulthandler writes their
stacks; a stopped process is continued so that it can), and every rank, on seeing the
report, writes the Python stacks of all its threads into `<run>/stacks/rank<R>.txt` and
exits EXIT_CODE_HANG, instead of waiting for the collective timeout.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

from nemotron_train import rundir

EXIT_CODE_HANG = 18
# Not SIGUSR1/SIGUSR2 (stop signals of the batch scripts) nor SIGTERM: free for the dump.
DUMP_SIGNAL = signal.SIGPWR if hasattr(signal, "SIGPWR") else signal.SIGUSR2
HANG_REPORT = "hang.json"


def heartbeat_file(run_dir, rank: int) -> Path:
    return rundir.heartbeat_dir(run_dir) / f"rank{rank}.json"


def stack_file(run_dir, rank: int) -> Path:
    return rundir.stacks_dir(run_dir) / f"rank{rank}.txt"


class HangWatchdog:
    def __init__(self, run_dir, rank: int, world_size: int, timeout_s: float, poll_s: Optional[float] = None):
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.timeout_s = float(timeout_s)
        self.poll_s = poll_s if poll_s is not None else min(max(self.timeout_s / 10, 0.1), 5.0)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step = 0
        self.progress_time = self.started = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stack_out: Optional[TextIO] = None

    # ---------------------------------------------------------------- main thread

    def start(self, step: int) -> None:
        rundir.heartbeat_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        rundir.stacks_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.beat(step)
        self._write_heartbeat("training")
        # faulthandler writes from its C signal handler, so it works while this process is
        # stuck inside a C call (a collective, a kernel launch) too.
        self._stack_out = open(stack_file(self.run_dir, self.rank), "a")
        faulthandler.register(DUMP_SIGNAL, file=self._stack_out, all_threads=True)
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.progress_time = step, time.time()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 4)
        self._write_heartbeat("done")
        faulthandler.unregister(DUMP_SIGNAL)
        if self._stack_out is not None:
            self._stack_out.close()
            path = stack_file(self.run_dir, self.rank)
            if path.exists() and path.stat().st_size == 0:
                path.unlink()

    # ---------------------------------------------------------------- watchdog thread

    def _run(self) -> None:
        watched = (self.rank + 1) % self.world_size
        while not self._stop.wait(self.poll_s):
            self._write_heartbeat("training")
            report = self._read(rundir.stacks_dir(self.run_dir) / HANG_REPORT)
            if report and report.get("time", 0) >= self.started:
                self._dump_and_exit(report, announce=False)
            # A single rank watches its own training thread (its file still carries its progress).
            if self._idle(watched, time.time()) > self.timeout_s:
                self._on_hang()

    def _write_heartbeat(self, state: str) -> None:
        record = {"rank": self.rank, "pid": self.pid, "host": self.host, "step": self.step, "state": state,
                  "progress_time": self.progress_time, "beat_time": time.time(), "started": self.started}
        path = heartbeat_file(self.run_dir, self.rank)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:  # a full or flaky file system must not kill training; the next poll retries
            pass

    @staticmethod
    def _read(path: Path) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _beat_of(self, rank: int) -> Optional[Dict[str, Any]]:
        beat = self._read(heartbeat_file(self.run_dir, rank))
        # A file older than this watchdog belongs to an earlier start of the job.
        return beat if beat and beat.get("beat_time", 0) >= self.started - self.timeout_s else None

    def _idle(self, rank: int, now: float) -> float:
        beat = self._beat_of(rank)
        if beat is None:  # not started yet (or its file lost): count from our own start
            return now - self.started
        if beat.get("state") == "done":
            return 0.0
        return now - max(beat.get("progress_time", 0.0), self.started)

    def _on_hang(self) -> None:
        now = time.time()
        beats = {r: self._beat_of(r) for r in range(self.world_size)}
        frozen = [r for r, b in beats.items() if r != self.rank and (b is None or now - b["beat_time"] > 3 * self.poll_s)]
        idle = {r: self._idle(r, now) for r in range(self.world_size)}
        if frozen:
            stuck = frozen
        else:  # all alive: the rank(s) that stopped progressing first
            longest = max(idle.values())
            stuck = [r for r, v in idle.items() if v >= longest - self.poll_s]
        report = {"time": now, "detected_by": self.rank, "timeout_s": self.timeout_s, "stuck": stuck, "frozen": frozen,
                  "ranks": {r: {"step": (b or {}).get("step"), "idle_s": round(idle[r], 2), "host": (b or {}).get("host"),
                                "pid": (b or {}).get("pid")} for r, b in beats.items()}}
        if not self._claim(report):
            return  # another rank reported first; this one follows its report at the next poll
        for r in stuck:
            b = beats.get(r)
            if b and b.get("host") == self.host and r != self.rank:
                _signal_for_dump(int(b["pid"]))
        self._dump_and_exit(report, announce=True)

    def _claim(self, report: Dict[str, Any]) -> bool:
        path = rundir.stacks_dir(self.run_dir) / HANG_REPORT
        old = self._read(path)
        if old and old.get("time", 0) < self.started:
            path.unlink(missing_ok=True)  # left by an earlier start of the job
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
        return True

    def _dump_and_exit(self, report: Dict[str, Any], announce: bool) -> None:
        if self._stack_out is not None:
            self._stack_out.write(f"--- rank {self.rank} (pid {self.pid}, {self.host}) at hang report, step {self.step}\n")
            self._stack_out.flush()
            faulthandler.dump_traceback(file=self._stack_out, all_threads=True)
            self._stack_out.flush()
        if announce:
            # Give the other ranks a few polls to write their stacks before the job is torn down.
            deadline = time.time() + 10 * self.poll_s
            while time.time() < deadline and not all(_nonempty(stack_file(self.run_dir, r)) for r in range(self.world_size)):
                time.sleep(self.poll_s / 2)
            print(describe_hang(report, self.run_dir), file=sys.stderr, flush=True)
        os._exit(EXIT_CODE_HANG)


def describe_hang(report: Dict[str, Any], run_dir) -> str:
    ranks = report["ranks"]
    lines = []
    for r in report["stuck"]:
        info = ranks.get(r, ranks.get(str(r), {}))
        state = ("its process is not running (stopped, frozen or gone: its heartbeat stopped too)"
                 if r in report["frozen"] else "its process runs but its training thread is blocked")
        lines.append(f"rank {r} made no progress for {info.get('idle_s')} s after step {info.get('step')} "
                     f"on {info.get('host')} (pid {info.get('pid')}): {state}")
    return (f"error: hang detected (resilience.hang_timeout_s={report['timeout_s']:g}): " + "; ".join(lines)
            + f". Stack dumps of every rank: {rundir.stacks_dir(run_dir)}/rank*.txt")


def _signal_for_dump(pid: int) -> None:
    try:
        os.kill(pid, DUMP_SIGNAL)
        # A stopped process handles the dump signal only once continued.
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False

