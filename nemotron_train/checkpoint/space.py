"""Disk space for a checkpoint save: refuse a save that cannot fit before anything is
written, and turn a full disk during a save into one error that names the directory and the
space needed. The previous checkpoint is never touched either way: a new one is written
next to it and the old one is pruned only after the new one is committed, so a save needs
room for one whole checkpoint on top of those kept (`checkpoint.keep_last`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from nemotron_train.errors import CheckpointError


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or the
    nearest existing directory above it)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def not_enough_space(root: Path, step: int, needed: int, free: int, written: Optional[int] = None) -> CheckpointError:
    got = f" ({mib(written)} written before the disk filled)" if written else ""
    return CheckpointError(
        f"not enough disk space to save step {step} in {root}: it needs about {mib(needed)}, {mib(free)} free{got}. "
        "The previous checkpoint is intact (it is pruned only after a new one is committed). Free space, "
        "lower checkpoint.keep_last, or point checkpoint.dir at a larger filesystem."
    )


def shortfall(root: Path, step: int, expected: Optional[int]) -> Optional[CheckpointError]:
    """The error for a save of about `expected` bytes that cannot fit (None when it fits or
    the size is not known yet, e.g. the first save: a full disk then fails the write)."""
    if not expected:
        return None
    free = free_bytes(root)
    # Some slack for metadata and filesystem blocks.
    needed = int(expected * 1.05) + 2**20
    return not_enough_space(root, step, needed, free) if free < needed else None


def is_out_of_space(exc: BaseException) -> bool:
    """Whether a failed write ran out of space (the writers' errors arrive wrapped, as text)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)
