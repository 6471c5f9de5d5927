"""Straggler report: each rank's step time split into forward-backward, optimizer and data
wait, averaged over the steps since the last report and compared across ranks.

One all-reduce of world_size x 3 numbers per logging step. On a GPU the times are host
times; the loss and grad-norm reads of every step synchronise the device, so they include
the device's work.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist

PHASES = ("forward_backward", "optimizer", "data")


class StepTimes:
    """Seconds per phase summed since the last `take()`."""

    def __init__(self) -> None:
        self.data_wait = 0.0
        self._sums = [0.0, 0.0, 0.0]
        self._steps = 0
        self._data_at_step_start = 0.0

    def add(self, forward_backward_s: float, optimizer_s: float) -> None:
        data = self.data_wait - self._data_at_step_start
        self._data_at_step_start = self.data_wait
        # The data iterator is read inside the forward-backward schedule: split it out.
        self._sums[0] += max(forward_backward_s - data, 0.0)
        self._sums[1] += optimizer_s
        self._sums[2] += data
        self._steps += 1

    def take(self) -> List[float]:
        """Mean seconds per step of each phase since the last call; resets the sums."""
        n = max(self._steps, 1)
        means = [s / n for s in self._sums]
        self._sums, self._steps = [0.0, 0.0, 0.0], 0
        return means


class TimedIterator:
    """Adds the time spent waiting in `next()` to `times.data_wait`."""

    def __init__(self, iterator: Iterator, times: StepTimes) -> None:
        self.iterator, self.times = iterator, times

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.times.data_wait += time.perf_counter() - start


def straggler_report(means: List[float], world_size: int, rank: int) -> Dict[str, Any]:
    """Slowest and fastest rank by total step time, their phases and the ratio (every rank
    gets the same report: a collective)."""
    local = torch.zeros(world_size, len(PHASES), dtype=torch.float64)
    local[rank] = torch.tensor(means, dtype=torch.float64)
    return summarise(sum_over_ranks(local))


def summarise(table: List[List[float]]) -> Dict[str, Any]:
    """The report of a ranks x PHASES table of mean seconds per step."""
    totals = [sum(row) for row in table]
    slow = max(range(len(table)), key=lambda r: totals[r])
    fast = min(range(len(table)), key=lambda r: totals[r])
    report: Dict[str, Any] = {
        "straggler_ratio": totals[slow] / totals[fast] if totals[fast] > 0 else 1.0,
        "slowest_rank": slow,
        "fastest_rank": fast,
    }
    for name, r in (("slowest", slow), ("fastest", fast)):
        report[f"{name}_step_s"] = totals[r]
        for phase, value in zip(PHASES, table[r]):
            report[f"{name}_{phase}_s"] = value
    return report


def format_report(report: Dict[str, Any]) -> str:
    """The console fragment: `slowest r1 412 ms (fb 380 / opt 20 / data 12), fastest r0 ...: 1.05x`."""

    def ms(key: str) -> str:
        return f"{report[key] * 1000:.0f}"

    parts = []
    for name in ("slowest", "fastest"):
        parts.append(
            f"r{report[f'{name}_rank']} {ms(f'{name}_step_s')} ms (fb {ms(f'{name}_forward_backward_s')} / "
            f"opt {ms(f'{name}_optimizer_s')} / data {ms(f'{name}_data_s')})"
        )
    return f"slowest {parts[0]}, fastest {parts[1]}: {report['straggler_ratio']:.2f}x"


def sum_over_ranks(local: torch.Tensor) -> List[List[Any]]:
    """Sum of every rank's table (each fills its own row): every rank's rows, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return local.tolist()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    table = local.to(device)
    dist.all_reduce(table)
    return table.tolist()
