"""One run per output directory: an exclusive lock held by rank 0 for the whole run.

Two runs started on one directory would interleave their checkpoint renames, prunes and
tracker writes. Rank 0 takes `<run.output_dir>/run.lock` (`rundir.lock_file`) with
`fcntl.flock` before anything is written there; the kernel drops the lock when the process
dies, SIGKILL included, so a lock left by a dead run is free and is taken over (and said
so). The file records the holder's host, pid and start time, for the message a second run
prints; a clean exit empties it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from nemotron_train import rundir
from nemotron_train.errors import CheckpointError


class RunLockedError(CheckpointError):
    """Another live run holds the output directory."""


def _read_holder(fd: int) -> Dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: Dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {when}"


class RunLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = rundir.lock_file(self.output_dir)
        self._fd: Optional[int] = None
        self.took_over: Optional[str] = None  # the stale holder replaced, for the log

    def acquire(self) -> "RunLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(
                f"{self.output_dir} is in use by another run ({_describe(holder)}; lock file {self.path}). "
                "Wait for it to end or stop it, or give this run another run.output_dir."
            ) from None
        previous = _read_holder(fd)
        if previous.get("pid"):
            self.took_over = _describe(previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        if self.took_over:
            print(f"note: took over the lock of a run that is no longer running ({self.took_over})", file=sys.stderr, flush=True)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: nobody to report, nothing to take over
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None



def lock_run_dir(output_dir: str | os.PathLike, rank: int) -> Optional[RunLock]:
    """Rank 0 takes the run lock; every rank learns whether it got it (one all-reduce), so a
    refused run stops on all ranks with the same error instead of leaving some waiting."""
    import torch
    import torch.distributed as dist

    lock: Optional[RunLock] = None
    error: Optional[RunLockedError] = None
    if rank == 0:
        try:
            lock = RunLock(output_dir).acquire()
        except RunLockedError as exc:
            error = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        refused = torch.tensor([int(error is not None)], device=device)
        dist.all_reduce(refused, op=dist.ReduceOp.MAX)
        if refused.item() and error is None:
            raise RunLockedError(f"{output_dir} is in use by another run (rank 0 names the holder)")
    if error is not None:
        raise error
    return lock
