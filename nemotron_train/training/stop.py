"""Graceful stop for training ranks: exit signals, the time limit, and how a job ends.

A scheduler asks a job to stop by signal (SLURM: `#SBATCH --signal=B:USR1@120` forwarded by
the batch script, `scancel --signal=TERM`, preemption) or the run hits its own
`train.exit_duration_minutes` or `train.exit_interval` (a step count, as Megatron's
`--exit-interval`). Every rank must take the same decision at the same step, or
the ranks that stop deadlock in the checkpoint collectives while the others wait in the next
step's. So each rank only *records* a signal, and `should_exit` all-reduces (MAX) the flags
over the process group once per step: all ranks see the same answer.

How a job ends is what the batch script and a chain of jobs act on:

- all `train.steps` done: rank 0 writes `<run.output_dir>/COMPLETED` (`mark_completed`; the
  path is `nemotron_train.rundir.completed_marker`) and
  the ranks exit `EXIT_CODE_DONE` (0). Later jobs of a chain see the marker and exit at once.
- stopped early with a checkpoint saved: the ranks exit `resumable_exit_code()`, which is
  `EXIT_CODE_RESUMABLE` (75) unless torchrun supervises them (see there). The next job of the
  chain resumes from the latest checkpoint.
- anything else is a failure and keeps its own exit code.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Dict, Iterable, List, Optional

from nemotron_train.errors import ConfigError
from nemotron_train.rundir import COMPLETED_MARKER, PathLike, completed_marker

__all__ = [
    "COMPLETED_MARKER", "DEFAULT_EXIT_SIGNALS", "EXIT_CODE_DONE", "EXIT_CODE_RESUMABLE", "ExitSignalHandler",
    "clear_completed", "completed_marker", "completed_steps", "exit_signal_names", "is_completed",
    "install_stop_handler", "job_exit_code", "mark_completed", "resumable_exit_code", "should_exit", "signal_name",
]

EXIT_CODE_DONE = 0
# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_CODE_RESUMABLE = 75
DEFAULT_EXIT_SIGNALS = ("SIGTERM", "SIGUSR1")


def signal_name(name: str) -> str:
    """Canonical name of a signal: `usr1`, `USR1`, `SIGUSR1` -> `SIGUSR1`. ConfigError if unknown."""
    text = str(name).strip().upper()
    canonical = text if text.startswith("SIG") else f"SIG{text}"
    if not isinstance(getattr(signal, canonical, None), signal.Signals):
        raise ConfigError(f"unknown signal {name!r}; use a name such as SIGTERM, SIGUSR1 or SIGUSR2")
    return canonical


def exit_signal_names(extra: Optional[str] = None) -> tuple[str, ...]:
    """The signals a rank treats as "stop": SIGTERM, SIGUSR1 and `train.exit_signal`."""
    names: List[str] = [signal_name(n) for n in DEFAULT_EXIT_SIGNALS]
    if extra and signal_name(extra) not in names:
        names.append(signal_name(extra))
    return tuple(names)


class ExitSignalHandler:
    """Records receipt of exit signals instead of dying on them.

    Installed on construction (the process's main thread only, a rule of Python's `signal`);
    `restore()` or leaving a `with` block puts the previous handlers back. The handler only
    records: a rank must not stop on its own (see the module docstring), and printing from a
    handler can re-enter a stream that the interrupted code is writing.
    """

    def __init__(self, signal_names: Iterable[str] = DEFAULT_EXIT_SIGNALS, install: bool = True) -> None:
        names = list(dict.fromkeys(signal_name(n) for n in signal_names))
        if not names:
            raise ValueError("ExitSignalHandler needs at least one signal name")
        self.signals = tuple(signal.Signals[n] for n in names)
        self._received: List[signal.Signals] = []
        self._previous: Dict[signal.Signals, Any] = {}
        self._atexit_registered = False
        if install:
            self.install()

    def install(self) -> "ExitSignalHandler":
        if self._previous:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ExitSignalHandler must be installed from the main thread (a rule of Python's signal module)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        if not self._atexit_registered:
            atexit.register(self._ignore_at_exit)
            self._atexit_registered = True
        return self

    def _ignore_at_exit(self) -> None:
        """Python puts the default action (death) back on handled signals as it shuts down,
        so a stop signal arriving then, e.g. one SLURM delivered to this rank a moment after
        the rank that stopped the run, would turn a clean exit into a kill by signal. An
        exiting process has nothing left to stop: ignore them instead."""
        if self._previous:
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "ExitSignalHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        self._received.append(signal.Signals(signum))

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def received(self) -> Optional[str]:
        """Name of the first signal received (e.g. "SIGTERM"), or None."""
        return self._received[0].name if self._received else None

    @property
    def received_signals(self) -> List[str]:
        return [s.name for s in self._received]

    def reset(self) -> None:
        self._received.clear()

    def extend(self, signal_names: Iterable[str]) -> "ExitSignalHandler":
        """Also handle `signal_names` (installed at once when this handler is installed)."""
        for name in signal_names:
            sig = signal.Signals[signal_name(name)]
            if sig not in self.signals:
                self.signals += (sig,)
                if self._previous:
                    self._previous[sig] = signal.signal(sig, self._record)
        return self


_STOP_HANDLER: Optional[ExitSignalHandler] = None


def install_stop_handler(exit_signal: Optional[str] = None) -> ExitSignalHandler:
    """The process's one stop-signal handler, installed on the first call and extended by
    `exit_signal` on later ones. A rank calls it first thing (before the config is read and
    again at the start of setup), so a SIGTERM or SIGUSR1 that arrives while the model, data
    or checkpoint are being set up is recorded, not fatal, and honoured at the first step."""
    global _STOP_HANDLER
    if _STOP_HANDLER is None or not _STOP_HANDLER.installed:
        _STOP_HANDLER = ExitSignalHandler(exit_signal_names(exit_signal))
    else:
        _STOP_HANDLER.extend(exit_signal_names(exit_signal))
    return _STOP_HANDLER


def _local_flags(
    handler: Optional[ExitSignalHandler],
    start_time: float,
    exit_duration_minutes: Optional[float],
    step: Optional[int] = None,
    exit_interval: Optional[int] = None,
) -> List[int]:
    if exit_duration_minutes is not None and exit_duration_minutes <= 0:
        raise ConfigError(
            f"train.exit_duration_minutes={exit_duration_minutes}: must be > 0 (minutes of training per job), or null for no limit"
        )
    if exit_interval is not None and exit_interval <= 0:
        raise ConfigError(f"train.exit_interval={exit_interval}: must be > 0 (stop at every multiple of it), or null")
    sig = int(handler._received[0]) if handler is not None and handler._received else 0
    over_time = exit_duration_minutes is not None and (time.time() - start_time) / 60.0 >= exit_duration_minutes
    # Megatron's --exit-interval: the step count, not the clock, so every machine cuts at the same step.
    at_interval = exit_interval is not None and step is not None and step > 0 and step % exit_interval == 0
    return [sig, int(over_time), int(at_interval)]


def _agree(flags: List[int], group: Any) -> List[int]:
    """MAX-all-reduce the flags over `group` when torch.distributed is up; else return them."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # a launcher-only environment without torch: single process
        return flags
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    # NCCL reduces only CUDA tensors; gloo (and the CPU half of a mixed backend) takes CPU ones.
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(flags, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in tensor.tolist()]


def should_exit(
    handler: Optional[ExitSignalHandler],
    start_time: float,
    exit_duration_minutes: Optional[float],
    group: Any = None,
    step: Optional[int] = None,
    exit_interval: Optional[int] = None,
) -> Optional[str]:
    """Whether the ranks should stop now; the same answer on every rank of `group`.

    `start_time` is `time.time()` when this process started training; `exit_duration_minutes`
    None means no time limit. `step` is the step just trained and `exit_interval`
    (`train.exit_interval`) stops at each multiple of it. Returns "signal SIGTERM" (any rank
    received an exit signal), "time limit" (any rank is past the limit), "exit interval", or
    None. A collective when torch.distributed is initialized: every rank of `group` (default:
    the world) must call it at the same step.
    """
    sig, over_time, at_interval = _agree(_local_flags(handler, start_time, exit_duration_minutes, step, exit_interval), group)
    if sig:
        return f"signal {signal.Signals(sig).name}"
    if over_time:
        return "time limit"
    if at_interval:
        return "exit interval"
    return None


def resumable_exit_code() -> int:
    """The exit code of a rank that stopped early with its checkpoint saved.

    Under torchrun (which sets TORCHELASTIC_RUN_ID for its workers) this is 0: torchrun treats
    any non-zero worker exit as a failure, restarting the workers when `--max-restarts` allows
    and otherwise exiting 1, so 75 would never reach the batch script. There the missing
    COMPLETED marker tells "stopped early" from "done" (see `job_exit_code`).
    """
    return EXIT_CODE_DONE if "TORCHELASTIC_RUN_ID" in os.environ else EXIT_CODE_RESUMABLE


def mark_completed(output_dir: PathLike, steps: Optional[int] = None) -> Path:
    """Write `<output_dir>/COMPLETED` (rank 0, after the final checkpoint is saved).

    The first line is the number of steps trained when known: a batch script for a longer
    run (more `train.steps` in the same output dir) then carries on instead of exiting.
    """
    path = completed_marker(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = str(int(steps)) if steps is not None else ""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{first}\ncompleted at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    os.replace(tmp, path)  # atomic: a job starting now never sees a half-written marker
    return path


def completed_steps(output_dir: PathLike) -> Optional[int]:
    """Steps recorded in the COMPLETED marker; None if there is no marker or no number in it."""
    path = completed_marker(output_dir)
    try:
        first = path.read_text().splitlines()[0:1]
    except FileNotFoundError:
        return None
    digits = "".join(ch for ch in (first[0] if first else "") if ch.isdigit())
    return int(digits) if digits else None


def is_completed(output_dir: PathLike, steps: Optional[int] = None) -> bool:
    """Whether the run in `output_dir` is done; with `steps`, done with at least that many.

    A marker without a step count counts as done for any `steps`.
    """
    if not completed_marker(output_dir).is_file():
        return False
    recorded = completed_steps(output_dir)
    return steps is None or recorded is None or recorded >= steps


def clear_completed(output_dir: PathLike) -> None:
    completed_marker(output_dir).unlink(missing_ok=True)


def job_exit_code(returncode: int, output_dir: PathLike, steps: Optional[int] = None) -> int:
    """The exit code of a whole job from its launcher's code, as the batch scripts compute it:
    0 when the run is complete, EXIT_CODE_RESUMABLE when it ended cleanly (0 or 75) without
    completing, else the launcher's code (a failure)."""
    if is_completed(output_dir, steps):
        return EXIT_CODE_DONE
    if returncode in (EXIT_CODE_DONE, EXIT_CODE_RESUMABLE):
        return EXIT_CODE_RESUMABLE
    return returncode
