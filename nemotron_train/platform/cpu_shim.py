"""Run megatron-core on CPU by redirecting its CUDA-only calls.

megatron-core assumes a GPU in a few dozen places: `torch.cuda.current_device()`,
`synchronize`, CUDA RNG state, events/streams, NVTX ranges, `device='cuda'` literals,
`.cuda()`, and `tensor.type() == 'torch.cuda.FloatTensor'` checks in the optimizer.
This module patches exactly those, once, and only when no GPU is present. Nothing else
in the project special-cases the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # `device=torch.cuda.current_device()` passes a bare index, which means an accelerator.
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps tensor placement on 'cuda' to 'cpu' and reports CPU tensors as cuda types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # mcore's optimizer dispatches on 'torch.cuda.FloatTensor' etc.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and args:
            # Positional ints here are sizes or dtypes' neighbours, not devices: map names only.
            args = tuple("cpu" if isinstance(a, (str, torch.device)) and _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream(_NullEvent):
    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass


def _noop_factory():
    # A fresh function per patched attribute: torch._dynamo maps torch.cuda functions by
    # identity and rejects one object registered under two names.
    def _noop(*args, **kwargs):
        return None

    return _noop


def _patch_cuda_module() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.synchronize = _noop_factory()
    cuda.set_device = _noop_factory()
    cuda.empty_cache = _noop_factory()
    # The CUDA RNG tracker forks "cuda" generator states for TP regions; on CPU the
    # default CPU generator plays that role, so dropout inside forks stays reproducible.
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = _noop_factory()
    cuda.Event = _NullEvent
    cuda.Stream = _NullStream
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda s=None: contextlib.nullcontext()
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = _noop_factory()
    cuda.nvtx.range_push = _noop_factory()
    cuda.nvtx.range_pop = _noop_factory()
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    # mcore's random.py sets CUDA RNG state through these private hooks.
    import torch.cuda.random as cuda_random

    cuda_random.get_rng_state = cuda.get_rng_state
    cuda_random.set_rng_state = cuda.set_rng_state
    _patch_mcore_rng()


def _patch_mcore_rng() -> None:
    """mcore's `_set_cuda_rng_state` goes through CUDA generators; point it at the CPU one."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    if hasattr(mcore_random, "_get_cuda_rng_state"):
        mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()


def _patch_custom_backward() -> None:
    """The autograd engine runs custom `Function.backward`s without the Python mode stack,
    and mcore's parallel linears allocate `device=torch.cuda.current_device()` buffers there:
    re-enter the redirection around each custom backward."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        if torch._C._len_torch_function_stack() > 0:
            return original(self, *args)
        with _CudaToCpuMode():
            return original(self, *args)

    BackwardCFunction.apply = apply


class _DropSharedGeneratorWarning(logging.Filter):
    """On CPU the "CUDA" RNG tracker and the CPU RNG are one generator, so mcore's check that
    a fork left the CPU state alone always fires; the warning is expected and dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def install_cpu_shims() -> None:
    """Idempotently install the CPU redirections (process-wide)."""
    global _installed
    with _lock:
        if _installed:
            return
        _patch_cuda_module()
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropSharedGeneratorWarning())
        _CudaToCpuMode().__enter__()  # stays active for the life of the process
        _patch_custom_backward()
        _installed = True


def cpu_shims_installed() -> bool:
    return _installed
