"""Device and communication backend selection.

CUDA + NCCL when a GPU is present; otherwise CPU + gloo with megatron-core's CUDA-only
calls redirected (see cpu_shim). This is the only place the project branches on it.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from nemotron_train.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: `plan` and the resolver run without it
    import torch


@dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"

    @property
    def device(self) -> "torch.device":
        import torch

        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


def check_environment() -> None:
    """The project's environment variables, checked before anything is built, so a bad value
    is one error naming the variable rather than a traceback at first use."""
    forced = os.environ.get("NEMOTRON_TRAIN_DEVICE", "").lower()
    if forced not in ("", "cpu", "cuda"):
        raise ConfigError(f"NEMOTRON_TRAIN_DEVICE={forced!r} is not a device; use cpu or cuda, or unset it")
    peak = os.environ.get("NEMOTRON_TRAIN_PEAK_TFLOPS")
    if peak:
        try:
            ok = math.isfinite(float(peak)) and float(peak) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"NEMOTRON_TRAIN_PEAK_TFLOPS={peak!r} must be a positive number (TFLOP/s of one device)")


def detect_platform() -> Platform:
    import torch

    check_environment()
    forced = os.environ.get("NEMOTRON_TRAIN_DEVICE", "").lower()
    if forced == "cuda" and not torch.cuda.is_available():
        raise ConfigError("NEMOTRON_TRAIN_DEVICE=cuda but no CUDA device is visible")
    if forced != "cpu" and torch.cuda.is_available():
        return Platform("cuda", "nccl")
    return Platform("cpu", "gloo")


# Variables a scheduler sets when it grants a process GPUs (SLURM's gres/gpu sets them all).
GRANTED_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def cpu_fallback_notice(environ: Mapping[str, str], platform: Platform) -> Optional[str]:
    """A one-line notice when the scheduler granted GPUs but this process trains on CPU
    (a torch without CUDA, or no driver): the job runs, and the log says why it is on CPU.
    None when nothing was granted, or the run is on CUDA, or the CPU was asked for."""
    if not platform.is_cpu or environ.get("NEMOTRON_TRAIN_DEVICE", "").lower() == "cpu":
        return None
    none = ("", "-1", "NoDevFiles")  # what "no GPU" looks like in these variables
    granted = [f"{name}={environ[name]}" for name in GRANTED_GPU_VARS
               if environ.get(name, "").strip() not in none + (("0",) if name == "SLURM_GPUS_ON_NODE" else ())]
    if not granted:
        return None
    return (f"notice: GPUs were granted ({', '.join(granted)}) but torch sees no CUDA device "
            "(a CPU build of torch, or no driver): training on CPU with gloo")


# What the `te` layer spec runs on: TE linears/attention, and mcore's MambaMixer, which calls
# mamba-ssm's SSD kernels and causal-conv1d's conv kernel directly.
GPU_KERNEL_MODULES = ("transformer_engine", "mamba_ssm", "causal_conv1d")


def missing_gpu_kernels() -> list[str]:
    """The GPU kernel packages of GPU_KERNEL_MODULES that are not installed."""
    import importlib.util

    return [m for m in GPU_KERNEL_MODULES if importlib.util.find_spec(m) is None]


def set_torch_compile(enabled: bool) -> None:
    """Whether megatron-core's `jit_fuser` functions (squared-ReLU, bias-dropout-add, ...) are
    torch.compile'd. The resolver decides it once (`performance.torch_compile`; off on CPU,
    where compiling costs about 20 s per process on the first step and gains nothing for
    CPU-sized models; the eager results are the same numbers)."""
    import torch._dynamo

    torch._dynamo.config.disable = not enabled


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of this process. torchrun shows every GPU of the node to every rank
    (device = LOCAL_RANK); SLURM with `--gpus-per-task=1` / GPU binding shows each task only
    its own GPU, so LOCAL_RANK may exceed the visible count: then it is LOCAL_RANK modulo it."""
    if visible_devices < 1:
        raise ConfigError("no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES and the GPU binding)")
    return local_rank % visible_devices


def deterministic_env(deterministic: bool) -> dict:
    """Environment a deterministic run needs before TE builds its layers: TE attention refuses
    `deterministic_mode` unless non-deterministic algorithms are disallowed
    (NVTE_ALLOW_NONDETERMINISTIC_ALGO=0), and cuBLAS needs a fixed workspace."""
    if not deterministic:
        return {}
    return {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def setup_platform(force_cpu: bool = False, torch_compile: Optional[bool] = None, deterministic: bool = False) -> Platform:
    """Pick the platform (CPU when `force_cpu`, even with a GPU) and, on CPU, install the
    redirections megatron-core needs. `torch_compile` is the resolved
    `performance.torch_compile` (None: on for CUDA, off on CPU)."""
    platform = Platform("cpu", "gloo") if force_cpu else detect_platform()
    notice = None if force_cpu else cpu_fallback_notice(os.environ, platform)
    if notice and os.environ.get("RANK", "0") == "0":
        print(notice, flush=True)
    # Set, not defaulted: a deterministic run with NVTE_ALLOW_NONDETERMINISTIC_ALGO=1 fails in TE.
    os.environ.update(deterministic_env(deterministic))
    if platform.is_cpu:
        from nemotron_train.platform.cpu_shim import install_cpu_shims

        install_cpu_shims()
    else:
        import torch

        torch.cuda.set_device(cuda_device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    set_torch_compile(not platform.is_cpu if torch_compile is None else torch_compile)
    return platform


def init_distributed(platform: Platform, timeout_minutes: float = 10.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, MASTER_*).

    A single process without those variables becomes a world of one on a free port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = _restart_store(timeout)
    where = {} if store is None else dict(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend=platform.backend, timeout=timeout, **where)
    return dist.get_rank(), dist.get_world_size()


def _restart_store(timeout: datetime.timedelta):
    """After a torchrun restart (launch.max_restarts), the ranks' store keys under a prefix of
    their attempt: torchrun's agent keeps one store across attempts, and without the prefix
    the new ranks read the old ranks' addresses and fail to connect (torch 2.13, gloo)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/nemotron_train/attempt_{attempt}", store)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["Platform", "detect_platform", "setup_platform", "init_distributed", "free_port"]
