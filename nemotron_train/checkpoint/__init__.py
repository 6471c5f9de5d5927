"""Checkpoints: sharded save/resume (manager), Hugging Face interop (hf, convert), scoring.

Names resolve lazily so that importing the package (the CLI does, to register its commands)
does not import megatron-core.
"""

from importlib import import_module

_LAZY = {"Checkpointer": "manager", "CheckpointError": "manager", "read_tracker": "manager"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"nemotron_train.checkpoint.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'nemotron_train.checkpoint' has no attribute {name!r}")
