"""Manual garbage collection (`performance.manual_gc`), as Megatron's `--manual-gc`.

Python's cyclic collector runs whenever allocation counts cross a threshold, at a different
moment on every rank; a rank that stops for a collection stalls all others at the next
collective. With manual GC the automatic collector is off and every rank collects at the
same step, every `manual_gc_interval` steps (0: never during training).
"""

from __future__ import annotations

import gc


class ManualGC:
    def __init__(self, enabled: bool, interval: int) -> None:
        self.enabled = enabled
        self.interval = interval
        self.collections = 0
        self._was_enabled = gc.isenabled()
        if enabled:
            gc.disable()
            gc.collect()  # start from a clean heap: setup leaves many cycles behind

    def step(self, step: int) -> bool:
        """Call once per finished training step; returns whether it collected."""
        if not self.enabled or self.interval <= 0 or step % self.interval != 0:
            return False
        gc.collect()
        self.collections += 1
        return True

    def close(self) -> None:
        """Give the process back its automatic collector (as it was before)."""
        if self.enabled and self._was_enabled:
            gc.enable()
