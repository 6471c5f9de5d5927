"""Run checkpoints: the on-disk layout (layout), sharded save/resume (manager) and the
megatron-core 0.16 optimizer workarounds (mcore_fixes). Hugging Face interop is
`nemotron_train.hf`.

Names resolve lazily so that importing the package does not import megatron-core.
"""

from importlib import import_module

_LAZY = {
    "Checkpointer": "manager",
    "TrainState": "manager",
    "install_mcore_fixes": "mcore_fixes",
    "locate_checkpoint": "layout",
    "read_tracker": "layout",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"nemotron_train.checkpoint.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'nemotron_train.checkpoint' has no attribute {name!r}")
