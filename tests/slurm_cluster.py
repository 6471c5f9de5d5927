"""A throw-away one-node SLURM cluster for tests.

munged, slurmctld and slurmd run in the foreground from a private temporary directory with
their own munge socket, ports, state and logs, so a test run neither touches nor depends on
a system SLURM installation, and two test runs on one machine do not collide. Every client
command goes through `SlurmCluster.run`, which points `SLURM_CONF` at the private config.

Also here: `write_stub_trainer`, a stand-in for `python -m nemotron_train train` that obeys
the trainer's graceful-stop contract (see nemotron_train/training/stop.py) in a few lines, so the SLURM
plumbing can be tested end to end without the real model.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

import pytest

APT_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol")
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])

T = TypeVar("T")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or run here; the message says why (tests skip with it)."""


class SlurmStartError(RuntimeError):
    """SLURM is installed but the test cluster did not come up: a failure, with the daemon logs."""


def find_binary(name: str) -> Optional[str]:
    return shutil.which(name, path=_SEARCH_PATH)


def _missing_binaries() -> List[str]:
    return [name for name in DAEMONS + CLIENTS if find_binary(name) is None]


def ensure_installed(timeout: float = 900.0) -> None:
    """Install slurm-wlm and munge with apt-get when they are missing (root only)."""
    missing = _missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(missing)}) and not root, so cannot apt-get install them")
    if find_binary("apt-get") is None:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(missing)}) and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *APT_PACKAGES]
    with _no_service_starts():
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:  # stale or absent package lists: refresh once and retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-2000:]
        raise SlurmUnavailable(f"`{' '.join(install)}` failed (exit {result.returncode}):\n{tail}")
    still_missing = _missing_binaries()
    if still_missing:
        raise SlurmUnavailable(f"installed {APT_PACKAGES} but still missing: {', '.join(still_missing)}")


class _no_service_starts:
    """Package scripts would start system-wide munged/slurmd that nobody stops; a temporary
    policy-rc.d (the Debian mechanism for this) forbids it, unless one is already in place."""

    path = Path("/usr/sbin/policy-rc.d")

    def __enter__(self) -> None:
        self.created = not self.path.exists()
        if self.created:
            self.path.write_text("#!/bin/sh\nexit 101\n")
            self.path.chmod(0o755)

    def __exit__(self, *exc: object) -> None:
        if self.created:
            self.path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_name() -> str:
    """The short hostname (slurmctld insists on running on `SlurmctldHost`); jobs use the node
    name as rendezvous address, so fall back to localhost when it does not resolve."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def _detected_hardware() -> Dict[str, int]:
    """CPUs and memory as slurmd itself sees them, so the node does not come up drained."""
    out = subprocess.run([find_binary("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    cpus = int(fields.get("CPUs", len(os.sched_getaffinity(0))))
    memory = int(fields.get("RealMemory", 1024))
    return {"CPUs": cpus, "RealMemory": max(256, int(memory * 0.9))}


def wait_until(predicate: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


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
    root: Path
    node: str
    conf: Path
    env: Dict[str, str]
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)
    owns_root: bool = False  # a temporary root is removed by stop()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, root: Optional[Path] = None, timeout: float = 90.0) -> "SlurmCluster":
        """Install if needed, write the config, start the daemons and wait for an idle node."""
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to launch jobs; not root here")
        # Unix socket paths are limited to ~107 bytes: keep the root short.
        owns_root = root is None
        root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="nt-slurm-"))
        cluster = cls._configure(root)
        cluster.owns_root = owns_root
        atexit.register(cluster.stop)
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            print(cluster.daemon_logs())
            cluster.stop()
            raise
        return cluster

    @classmethod
    def _configure(cls, root: Path) -> "SlurmCluster":
        for sub in ("munge", "state", "spool", "log", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # munged wants its socket directory traversable
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        node = _node_name()
        conf = root / "slurm.conf"
        conf.write_text(_slurm_conf(root, node, _detected_hardware(), _free_port(), _free_port()))
        (root / "plugstack.conf").write_text("")  # keep a system plugstack (e.g. pyxis) out
        env = dict(os.environ, SLURM_CONF=str(conf))
        return cls(root=root, node=node, conf=conf, env=env)

    def _start_daemons(self, timeout: float) -> None:
        munge_dir = self.root / "munge"
        self._spawn(
            "munged",
            [
                find_binary("munged") or "munged", "--foreground", "--force",
                f"--socket={munge_dir / 'munge.socket'}", f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        wait_until(lambda: self._alive("munged") and (munge_dir / "munge.socket").exists(), 20, "munged socket")
        self._spawn("slurmctld", [find_binary("slurmctld") or "slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [find_binary("slurmd") or "slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        wait_until(self._node_idle, timeout, f"node {self.node} to be idle in sinfo")

    def _spawn(self, name: str, cmd: Sequence[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        # Own session: the daemons survive a Ctrl-C of the test runner until stop() ends them.
        self.procs[name] = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        out.close()

    def _alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise SlurmStartError(f"{name} is not running (exit code {code})\n{self.daemon_logs()}")
        return True

    def _node_idle(self) -> bool:
        for name in DAEMONS:
            self._alive(name)
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20)
        return result.returncode == 0 and f"{self.node} idle" in result.stdout

    def stop(self) -> None:
        """Cancel remaining jobs, then end the daemons (TERM, then KILL after 10 s). Idempotent."""
        if not self.procs:
            return
        self._stop_daemons()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_daemons(self) -> None:
        if all(self.procs[n].poll() is None for n in ("slurmctld", "slurmd") if n in self.procs):
            self._cancel_all_jobs()
        for name in reversed(list(self.procs)):  # slurmd, slurmctld, munged
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()

    def _cancel_all_jobs(self) -> None:
        try:
            ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False, timeout=20)
                # KillWait in the config bounds how long a cancelled job takes to go.
                wait_until(lambda: not self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split(), 60, "cancelled jobs to end")
        except (TimeoutError, subprocess.TimeoutExpired) as exc:
            print(f"slurm test cluster teardown: {exc}")

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
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")[-tail:]
            parts.append(f"----- {path.name} -----\n{text}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node cluster for the tests of one module; skips where SLURM cannot run."""
    try:
        cluster = SlurmCluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM test cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _slurm_conf(root: Path, node: str, hw: Dict[str, int], ctld_port: int, slurmd_port: int) -> str:
    return textwrap.dedent(
        f"""\
        ClusterName=nttest
        SlurmctldHost={node}(127.0.0.1)
        SlurmctldPort={ctld_port}
        SlurmdPort={slurmd_port}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        AuthInfo=socket={root}/munge/munge.socket
        CredType=cred/munge
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool/slurmd-%n
        SlurmctldPidFile={root}/run/slurmctld.pid
        SlurmdPidFile={root}/run/slurmd-%n.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd.log
        SlurmctldDebug=info
        SlurmdDebug=info
        PlugStackConfig={root}/plugstack.conf
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SwitchType=switch/none
        MpiDefault=none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        JobCompType=jobcomp/none
        MailProg=/bin/true
        SchedulerType=sched/builtin
        SelectType=select/cons_tres
        SelectTypeParameters=CR_CPU
        SlurmdParameters=config_overrides
        ReturnToService=2
        MinJobAge=3600
        KillWait=15
        InactiveLimit=0
        NodeName={node} NodeAddr=127.0.0.1 CPUs={hw['CPUs']} RealMemory={hw['RealMemory']} State=UNKNOWN
        PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
        """
    )


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


def main() -> int:
    """`python tests/slurm_cluster.py`: start a cluster for manual use, stop it on Ctrl-C."""
    try:
        cluster = SlurmCluster.start()
    except SlurmUnavailable as exc:
        print(f"cannot run SLURM here: {exc}")
        return 1
    print(f"one-node SLURM cluster up (node {cluster.node}); in another shell:\n  export SLURM_CONF={cluster.conf}\n"
          "Ctrl-C stops it.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
