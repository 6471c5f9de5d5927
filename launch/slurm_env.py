"""`python -m launch.slurm_env`: run a command as torch.distributed rank(s) of the current
SLURM job step (what rendered batch scripts run under `srun`).

    srun python -m launch.slurm_env -- python -m nemotron_train train CONFIG ...
    srun --ntasks-per-node=1 python -m launch.slurm_env --mode per-node --nproc-per-node G -- -m nemotron_train train ...
    python -m launch.slurm_env --expand 'node[001-004,010]'

The mapping itself (host lists, ranks, rendezvous port, torchrun options) is library code in
`nemotron_train.distributed.slurm`; this module is only its command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from nemotron_train.distributed.slurm import expand_hostlist, torch_env_from_slurm, torchrun_command
from nemotron_train.errors import USER_ERROR_EXIT_CODE, LaunchError, UserError


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm_env",
        description="Run a command as torch.distributed rank(s) of the current SLURM job step.",
    )
    parser.add_argument("--mode", choices=("per-gpu", "per-node"), default="per-gpu",
                        help="per-gpu: this task is one rank; per-node: run torchrun for this node's ranks")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (per-node mode)")
    parser.add_argument("--master-addr", default=None, help="rendezvous host (default: first node of the job)")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: derived from the job id)")
    parser.add_argument("--expand", metavar="HOSTLIST", default=None, help="print the hosts of HOSTLIST, one a line, and exit")
    parser.add_argument("--print", dest="dry_run", action="store_true", help="print what would run instead of running it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.expand is not None:
            print("\n".join(expand_hostlist(args.expand)))
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            raise LaunchError("no command to run: put it after `--`")
        if args.mode == "per-gpu":
            new_env = dict(os.environ, **torch_env_from_slurm(master_addr=args.master_addr, master_port=args.master_port))
        else:
            if args.nproc_per_node is None:
                raise LaunchError("--mode per-node needs --nproc-per-node (the GPUs per node)")
            new_env = dict(os.environ)
            command = torchrun_command(args.nproc_per_node, command, master_addr=args.master_addr, master_port=args.master_port)
    except UserError as exc:
        print(f"launch.slurm_env: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    if args.dry_run:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key in new_env and args.mode == "per-gpu":
                print(f"{key}={new_env[key]}")
        print(" ".join(command))
        return 0
    sys.stdout.flush()
    # exec, not a child: signals that SLURM sends this task then reach the rank itself.
    os.execvpe(command[0], command, new_env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
