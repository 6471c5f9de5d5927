"""`nemotron-train train CONFIG [key=value ...]`.

Under torchrun (or SLURM-mapped env) each process is one rank: it resolves the run once
(validation, spec, FP8 backend and checks) before any process group or weight exists. Run on
its own, the command resolves the run for `launch.nproc_per_node` x `launch.nnodes` ranks,
checks the data files and the port, and then starts this node's ranks through torchrun
itself; with `launch.nnodes` > 1, run it on every node with its `launch.node_rank` and node
0's `launch.master_addr` (a c10d rendezvous, as SLURM jobs use).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
from typing import TYPE_CHECKING, List

from nemotron_train.config import ConfigError, load_config
from nemotron_train.config.schema import Config
from nemotron_train.distributed.hosts import socket_ifname_env

if TYPE_CHECKING:  # the command line starts without torch: resolve is imported when a command runs
    from nemotron_train.resolve import ResolvedRun


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
        except socket.gaierror:
            raise ConfigError(
                f"launch.master_addr={cfg.launch.master_addr!r} is not a host name or address this machine can "
                "resolve; a single-node run uses launch.master_addr=127.0.0.1"
            ) from None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(
                    f"launch.master_addr={cfg.launch.master_addr} cannot be bound on this machine ({exc.strerror}); "
                    "a single-node run hosts the rendezvous itself, so use one of its addresses, e.g. 127.0.0.1"
                ) from None
            raise ConfigError(
                f"launch.master_port={cfg.launch.master_port} on {cfg.launch.master_addr} is already in use "
                f"(another run?); pick a free port, e.g. launch.master_port={cfg.launch.master_port + 1}"
            ) from None


def _multi_node_rendezvous(cfg: Config) -> List[str]:
    """torchrun's options for this node of a multi-node run without SLURM: a c10d rendezvous
    at launch.master_addr:master_port (node 0 hosts it); with launch.socket_ifname this node
    announces its address on that interface instead of whatever its hostname resolves to."""
    la = cfg.launch
    if _is_loopback(la.master_addr):
        raise ConfigError(
            f"launch.nnodes={la.nnodes} with launch.master_addr={la.master_addr}: the other nodes cannot reach a "
            "loopback address; set launch.master_addr to node 0's address (e.g. its address on launch.socket_ifname)"
        )
    args = [
        f"--nnodes={la.nnodes}", f"--node-rank={la.node_rank}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={la.master_addr}:{la.master_port}", f"--rdzv-id={cfg.run.name}",
    ]
    if la.socket_ifname:
        from nemotron_train.distributed.hosts import interface_address

        args.append(f"--local-addr={interface_address(la.socket_ifname)}")
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def preflight(cfg: Config, world_size: int) -> "ResolvedRun":
    """Everything that can be checked before any rank starts."""
    from nemotron_train.resolve import resolve_run

    run = resolve_run(cfg, world_size)
    from nemotron_train.data import check_data_config

    check_data_config(cfg)
    return run


def main(args: argparse.Namespace) -> int:
    from nemotron_train.training.stop import install_stop_handler

    if _under_launcher():  # a rank: a stop signal from here on is honoured at the first step
        install_stop_handler()
    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    for key, value in socket_ifname_env(cfg.launch.socket_ifname).items():
        os.environ.setdefault(key, value)  # read when the process group starts, in every launch mode
    if _under_launcher():
        from nemotron_train.resolve import resolve_run

        return _run_rank(resolve_run(cfg, int(os.environ["WORLD_SIZE"])))
    nproc, nnodes = cfg.launch.nproc_per_node, cfg.launch.nnodes
    # One rank is this process, unless restarts are asked for: torchrun does those.
    direct = nproc == 1 and nnodes == 1 and cfg.launch.max_restarts == 0
    if direct:  # this process is the rank (otherwise it execs torchrun below)
        install_stop_handler(cfg.train.exit_signal)
    run = preflight(cfg, nproc * nnodes)
    if direct:
        return _run_rank(run)
    if nnodes == 1:
        _check_port(cfg)
        rendezvous = [f"--master-addr={cfg.launch.master_addr}", f"--master-port={cfg.launch.master_port}"]
    else:
        rendezvous = _multi_node_rendezvous(cfg)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rendezvous,
        f"--max-restarts={cfg.launch.max_restarts}",
        "-m", "nemotron_train", "train", args.config, *overrides,
    ]
    what = f"node {cfg.launch.node_rank} of {nnodes}: {nproc}" if nnodes > 1 else f"{nproc}"
    print(f"starting {what} local ranks: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # exec, so a stop signal reaches torchrun; it forwards the ones listed here to the ranks
    # (whose handlers save a checkpoint and stop) and waits up to the timeout for them.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    # Megatron's TP/SP communication overlap relies on one hardware queue per GPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _run_rank(run: "ResolvedRun") -> int:
    from nemotron_train.training.loop import run as train
    from nemotron_train.training.resilience import BadStepError
    from nemotron_train.training.stop import mark_completed, resumable_exit_code

    try:
        summary = train(run)
    except BadStepError as exc:  # every rank stops at the same step; one of them says why
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if summary["stopped_early"]:
        return resumable_exit_code()
    if int(os.environ.get("RANK", "0")) == 0:
        mark_completed(run.cfg.run.output_dir, run.cfg.train.steps)
    return 0
