"""`nemotron-train train CONFIG [key=value ...]`.

Under torchrun (or SLURM-mapped env) each process is one rank. Run on its own, the command
checks the launch (config, ranks vs layout, port, data files) and then starts
`launch.nproc_per_node` local ranks through torchrun itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List

from nemotron_train.config import ConfigError, load_config
from nemotron_train.config.schema import Config
from nemotron_train.config.validate import validate_config


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model (torchrun or self-launched local ranks)")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--nproc-per-node", type=int, default=None, help="local ranks to start (sets launch.nproc_per_node)")
    p.set_defaults(func=main)


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _overrides(args) -> List[str]:
    extra = [f"launch.nproc_per_node={args.nproc_per_node}"] if args.nproc_per_node else []
    return list(args.overrides) + extra


def _check_port(cfg: Config) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((cfg.launch.master_addr, cfg.launch.master_port))
        except OSError:
            raise ConfigError(
                f"launch.master_port={cfg.launch.master_port} on {cfg.launch.master_addr} is already in use "
                f"(another run?); pick a free port, e.g. launch.master_port={cfg.launch.master_port + 1}"
            ) from None


def preflight(cfg: Config, world_size: int) -> None:
    """Everything that can be checked before any rank starts."""
    validate_config(cfg, world_size)
    if cfg.precision.fp8.enabled:
        from nemotron_train.fp8 import check_fp8_config, device_capability, resolve_backend
        from nemotron_train.platform import detect_platform

        device_type = detect_platform().device_type
        check_fp8_config(cfg, resolve_backend(cfg, device_type), device_capability(device_type))
    from nemotron_train.data import check_data_config

    check_data_config(cfg)


def main(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    if _under_launcher():
        return _run_rank(cfg)
    nproc = cfg.launch.nproc_per_node
    if cfg.launch.nnodes != 1:
        raise ConfigError(
            f"launch.nnodes={cfg.launch.nnodes}: multi-node runs start through torchrun or SLURM "
            "(see `nemotron-train sbatch`); run this command under torchrun on each node"
        )
    preflight(cfg, nproc)
    if nproc == 1:
        return _run_rank(cfg)
    _check_port(cfg)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-addr={cfg.launch.master_addr}",
        f"--master-port={cfg.launch.master_port}",
        "-m", "nemotron_train", "train", args.config, *overrides,
    ]
    print(f"starting {nproc} local ranks: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # exec, so a stop signal reaches torchrun; it forwards the ones listed here to the ranks
    # (whose handlers save a checkpoint and stop) and waits up to the timeout for them.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    # Megatron's TP/SP communication overlap relies on one hardware queue per GPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _run_rank(cfg: Config) -> int:
    from launch.signals import mark_completed, resumable_exit_code
    from nemotron_train.training.loop import run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_config(cfg, world)
    summary = run(cfg)
    if summary["stopped_early"]:
        return resumable_exit_code()
    if int(os.environ.get("RANK", "0")) == 0:
        mark_completed(cfg.run.output_dir, cfg.train.steps)
    return 0
