"""Resilience of a training run (docs/reliability.md): per-step numerical checks through
megatron-core's RerunStateMachine with stop/skip of a bad step (`guard.py`, `rerun.py`),
hang detection with stack dumps (`watchdog.py`) and the straggler report (`stragglers.py`).

Exports load lazily: the watchdog and the straggler summary work without megatron-core."""

from importlib import import_module

_EXPORTS = {
    "EXIT_CODE_BAD_STEP": "guard", "BadStepError": "guard", "StepGuard": "guard",
    "format_report": "stragglers", "EXIT_CODE_HANG": "watchdog", "HangWatchdog": "watchdog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
