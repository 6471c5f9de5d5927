"""Helpers for tests that need torch.distributed: gloo on the local host, no GPU.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, each with an
initialised gloo process group, calls `fn(rank, world_size, *args)` in each and returns the
per-rank results in rank order. `fn` must be importable by name (a module-level function)
and its return value must be `torch.save`-able. An exception on any rank is re-raised in
the caller with that rank's traceback, and the other ranks are stopped rather than left
hanging in a collective.

`single_process_group()` gives the current process a world of one (and optionally megatron
parallel_state with tp = pp = 1), undoing it on exit if it set it up.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import queue
import socket
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_distributed", "single_process_group", "init_megatron_parallel"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(rank: int, world_size: int, port: int) -> Dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _worker(fn, rank, world_size, port, args, env, timeout_s, results) -> None:
    os.environ.update(_dist_env(rank, world_size, port))
    os.environ.update(env)
    # Two cores are shared by all ranks; more intra-op threads only oversubscribe them.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    env: Optional[Dict[str, str]] = None,
    daemon: bool = True,
) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank.
    `daemon=False` lets the ranks start processes of their own (e.g. checkpoint writers)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, dict(env or {}), timeout_s, results),
            daemon=daemon,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: Dict[int, Any] = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"no result from ranks {missing} within {timeout_s}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join()
    return [out[r] for r in range(world_size)]


def init_megatron_parallel(tp: int = 1, pp: int = 1, cp: int = 1) -> None:
    """megatron parallel_state over the already initialised default group."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
    )


@contextlib.contextmanager
def single_process_group(megatron: bool = True) -> Iterator[None]:
    """A gloo world of one for this process (plus mcore parallel_state if `megatron`).

    Leaves an existing group alone and only tears down what it created."""
    from megatron.core import parallel_state

    created_dist = not dist.is_initialized()
    if created_dist:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    created_mpu = megatron and not parallel_state.model_parallel_is_initialized()
    if created_mpu:
        init_megatron_parallel(1, 1)
    try:
        yield
    finally:
        if created_mpu:
            parallel_state.destroy_model_parallel()
        if created_dist:
            dist.destroy_process_group()
