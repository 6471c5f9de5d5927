"""The trust boundary of reading a checkpoint.

Loading a checkpoint unpickles data: torch's distributed-checkpoint index (`.metadata`),
megatron-core's common state (`common.pt`) and sharded objects (RNG states, optimizer
step counters) are Python pickles, and unpickling can run arbitrary code. A run's own
checkpoints are as trustworthy as the run; a directory from elsewhere is not, unless you
trust whoever wrote it (see docs/checkpoints.md). `trust_notice` says so once per process
when a command reads a checkpoint this run did not write (`checkpoint.load`, `export-hf`,
`score`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Set

_NOTICED: Set[str] = set()


def trust_notice(path: str | Path) -> bool:
    """Print the notice for `path` the first time this process reads a foreign checkpoint;
    returns whether it printed."""
    if _NOTICED:
        return False
    _NOTICED.add(str(Path(path).resolve()))
    print(
        f"note: reading {path}, a checkpoint this run did not write. Loading a checkpoint unpickles data "
        "(torch distributed-checkpoint metadata, sharded objects), which can run code: load only checkpoints "
        "from a source you trust (docs/checkpoints.md, 'Trust').",
        file=sys.stderr,
        flush=True,
    )
    return True
