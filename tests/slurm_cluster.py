"""The SLURM cluster of a test session: `nemotron-train local-cluster` (launch/local_cluster.py)
with two nodes, each a network namespace with its own slurmd, address and hostname, and one
count-only GPU (GRES without a device), so jobs ask for `--gpus-per-node 1` as on a GPU cluster.

One cluster serves the whole pytest session (`shared_cluster`, torn down at exit) in its
own state directory, so it neither touches a system SLURM nor collides with another test
run. Installing SLURM is the set-up's job (`make test` runs `nemotron-train local-cluster
install` as root); where it is missing, or without root, the SLURM tests skip saying so.
Every client command goes through `SlurmCluster.run`, which points `SLURM_CONF` at the
cluster's config.

Also here: `write_stub_trainer`, a stand-in for `python -m nemotron_train train` that obeys
the trainer's graceful-stop contract (see nemotron_train/training/stop.py) in a few lines, so the SLURM
plumbing can be tested end to end without the real model.
"""

from __future__ import annotations

import atexit
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import local_cluster  # noqa: E402
from launch.local_cluster import ClusterState, wait_until  # noqa: E402,F401

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
NODES = 2
GPUS_PER_NODE = 1


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (tests skip with it)."""


@dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: int  # the batch script's exit status
    signal: int  # the signal that ended it, 0 if none
    fields: Dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass
class SlurmCluster:
    state: ClusterState
    env: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls) -> "SlurmCluster":
        reason = local_cluster.why_unavailable()
        if reason:
            raise SlurmUnavailable(reason)
        # A fresh state directory per session: a concurrent test run gets its own cluster.
        state = local_cluster.up(NODES, state_dir=Path(tempfile.mkdtemp(prefix="nt-c-")), gpus_per_node=GPUS_PER_NODE)
        return cls(state=state, env=state.env())

    def stop(self) -> None:
        local_cluster.down(self.state.root)

    @property
    def root(self) -> Path:
        return self.state.root

    @property
    def conf(self) -> Path:
        return self.state.conf

    @property
    def nodes(self) -> List[str]:
        return self.state.node_names

    @property
    def node(self) -> str:
        return self.nodes[0]

    def address(self, node: str) -> str:
        return self.state.addresses[node]

    def on_node(self, node: str, *cmd: str, **popen) -> subprocess.Popen:
        """Start `cmd` on `node` (its network, hostname and /etc/hosts), as a job would run."""
        return subprocess.Popen(local_cluster.node_command(self.state, node, list(cmd)), env=popen.pop("env", self.env), **popen)

    def node_processes(self, node: str, needle: str, job_id: Optional[str] = None) -> Dict[int, str]:
        """{pid: command line} of the processes on `node` whose command line contains `needle`
        (and, with `job_id`, that belong to that job)."""
        namespace = self.state.namespaces[self.nodes.index(node)]
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        found = {}
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline and (job_id is None or f"SLURM_JOB_ID={job_id}\0".encode() in _environ(pid)):
                found[int(pid)] = cmdline
        return found

    # ------------------------------------------------------------------ clients

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        full_env = dict(self.env, **(env or {}))
        full_env["SLURM_CONF"] = str(self.conf)
        result = subprocess.run(list(cmd), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}): {result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> JobInfo:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return JobInfo(job_id=job_id, state=fields.get("JobState", "UNKNOWN"), exit_code=int(code or 0), signal=int(sig or 0), fields=fields)

    def wait(self, job_id: str, timeout: float = 300) -> JobInfo:
        """Wait for a job to end; on timeout cancels it and raises with the daemon logs."""
        try:
            return wait_until(lambda: (lambda info: info if info.done else None)(self.job(job_id)), timeout, f"job {job_id} to end", interval=1.0)
        except TimeoutError as exc:
            state = self.job(job_id).state
            self.run("scancel", job_id, check=False)
            raise TimeoutError(f"{exc} (state {state})\n{self.daemon_logs()}") from None

    def wait_running(self, job_id: str, timeout: float = 60) -> JobInfo:
        return wait_until(lambda: (lambda i: i if i.state == "RUNNING" or i.done else None)(self.job(job_id)), timeout, f"job {job_id} to start")

    def scancel(self, job_id: str, signal_name: Optional[str] = None, batch: bool = False) -> None:
        args = ["scancel"]
        if signal_name:
            args.append(f"--signal={signal_name}")
        if batch:
            args.append("--batch")
        self.run(*args, job_id)

    def job_log(self, info: JobInfo) -> str:
        path = Path(info.fields.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"

    def explain(self, info: JobInfo) -> str:
        """Everything needed to understand a job that did not end as expected."""
        return f"job {info.job_id}: {info.state} exit {info.exit_code}:{info.signal}\n{self.job_log(info)}\n{self.daemon_logs()}"

    def daemon_logs(self, tail: int = 4000) -> str:
        return local_cluster.daemon_logs(self.state, tail)


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes() + b"\0"
    except OSError:
        return b""


_SHARED: List[SlurmCluster] = []


def shared_cluster() -> SlurmCluster:
    """The session's cluster, started on first use and removed when the session exits."""
    if not _SHARED:
        cluster = SlurmCluster.start()
        atexit.register(cluster.stop)
        _SHARED.append(cluster)
    return _SHARED[0]


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The running two-node cluster; skips (saying why) where SLURM cannot run."""
    try:
        yield shared_cluster()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM test cluster: {exc}")


# --------------------------------------------------------------------------- stub trainer

_STUB_MAIN = '''\
"""Stand-in for `python -m nemotron_train train CONFIG [overrides]` (tests only).

Obeys the trainer's graceful-stop contract: a step is a sleep, a checkpoint is a directory
plus latest_checkpointed_iteration.txt, metrics are JSON lines.
"""
import json
import os
import sys
import time

import yaml

from nemotron_train.training.stop import ExitSignalHandler, mark_completed, resumable_exit_code, should_exit


def load(path, overrides):
    cfg = yaml.safe_load(open(path))
    for item in overrides:
        key, _, text = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return cfg


def append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\\n")


def main(argv):
    assert argv[0] == "train", argv
    cfg = load(argv[1], argv[2:])
    train = cfg["train"]
    handler = ExitSignalHandler(("SIGTERM", "SIGUSR1", train.get("exit_signal") or "SIGTERM"))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = cfg["run"]["output_dir"]
    ckpt = os.path.join(out, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")}
    append(os.path.join(out, "ranks.jsonl"), dict(env, pid=os.getpid(), argv=argv))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    start = time.time()  # like the trainer: the time limit counts training, not start-up
    latest = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    step = int(open(latest).read()) if os.path.exists(latest) else 0
    job = os.environ.get("SLURM_JOB_ID")

    def save(step):
        if world > 1:
            dist.barrier()
        if rank == 0:
            os.makedirs(os.path.join(ckpt, f"iter_{step:07d}"), exist_ok=True)
            with open(latest + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(latest + ".tmp", latest)
        if world > 1:
            dist.barrier()

    reason = None
    while step < train["steps"]:
        time.sleep(float(os.environ.get("STUB_STEP_SECONDS", "0.5")))
        step += 1
        if rank == 0:
            append(os.path.join(out, "metrics.jsonl"), {"step": step, "job": job, "loss": 1.0 / step})
        reason = should_exit(handler, start, train.get("exit_duration_minutes"))
        if reason:
            break
    save(step)
    if reason:
        append(os.path.join(out, "stops.jsonl"), {"rank": rank, "step": step, "reason": reason, "job": job})
        return resumable_exit_code()
    if rank == 0:
        mark_completed(out, train["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


REAL_PACKAGE = Path(__file__).resolve().parents[1] / "nemotron_train"


def write_stub_trainer(directory: Path) -> Path:
    """Write a `nemotron_train` stand-in package under `directory`; put `directory` first on
    PYTHONPATH (and run the job outside the project root) so `-m nemotron_train` finds it.

    Only `__main__` is stood in: the package's path continues into the real package, so the
    stand-in and the launcher (`python -m launch.slurm_env`) import the real stop protocol
    (nemotron_train.training.stop) and SLURM mapping (nemotron_train.distributed.slurm)."""
    package = Path(directory) / "nemotron_train"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""Test stand-in for the trainer: its own __main__, the real package\'s modules."""\n'
        f"__path__.append({str(REAL_PACKAGE)!r})\n"
    )
    (package / "__main__.py").write_text(_STUB_MAIN)
    return Path(directory)
