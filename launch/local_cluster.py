"""`nemotron-train local-cluster`: a real multi-node SLURM cluster on one Linux machine.

    nemotron-train local-cluster install                      # apt-get install slurm-wlm munge (root)
    nemotron-train local-cluster up --nodes 2 [--cpus-per-node C] [--gpus-per-node G] [--state-dir DIR]
    nemotron-train local-cluster status [--state-dir DIR]
    nemotron-train local-cluster exec [--state-dir DIR] node2 -- COMMAND ...
    nemotron-train local-cluster down [--state-dir DIR]

Each node is a network namespace with its own address on a private bridge, its own hostname
(`node1` ... `nodeN`) and its own `slurmd`; `munged` and `slurmctld` run on the machine
itself, on the bridge. Everything (config, sockets, state, logs) lives in the state
directory, so the cluster neither touches nor depends on a system SLURM. Jobs submitted
with `SLURM_CONF=<state dir>/slurm.conf` run on the nodes as on a real cluster: the ranks
of a two-node job reach each other only over the bridge (interface `cluster0` in every
node, for `launch.socket_ifname=cluster0`). Needs root (namespaces, bridge, slurmd) and
Debian's `slurm-wlm` and `munge`. `down`, and an `up` that fails, remove every namespace,
link, daemon and file the cluster made.

Each node also offers `--gpus-per-node` GPUs (default 1) as count-only GRES, so jobs asking
for `--gpus-per-node` are scheduled as on a GPU cluster while running on the CPUs: slurm.conf
declares `GresTypes=gpu` and `Gres=gpu:G` per node, gres.conf `Name=gpu Count=G` with
autodetection off and `File=` placeholders in the state directory (character devices with
/dev/null's numbers). SLURM 22.05 drops a GPU without a `File=` from what slurmd reports,
which drains the node, so the placeholders are needed; nothing opens them (TaskPlugin=task/none
constrains no devices). A job then sees CUDA_VISIBLE_DEVICES set by SLURM as on a GPU node;
the trainer, whose torch finds no CUDA device, trains on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

from nemotron_train.errors import LaunchError

APT_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol")
TOOLS = ("ip", "unshare", "nsenter")
CLUSTER_IFNAME = "cluster0"  # each node's interface on the bridge
STATE_FILE = "cluster.json"
DEFAULT_GPUS_PER_NODE = 1  # count-only GRES per node: jobs may ask for --gpus-per-node
NETNS_RUN = Path("/run/netns")  # where `ip netns add` puts a namespace's handle
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])

T = TypeVar("T")


def default_state_dir() -> Path:
    # Unix socket paths are limited to ~107 bytes: the munge socket lives here, keep it short.
    return Path(tempfile.gettempdir()) / f"nt-cluster-{os.getuid()}"


def find_binary(name: str) -> Optional[str]:
    return shutil.which(name, path=_SEARCH_PATH)


def missing_binaries() -> List[str]:
    return [name for name in DAEMONS + CLIENTS + TOOLS if find_binary(name) is None]


def why_unavailable() -> Optional[str]:
    """Why a local cluster cannot start here (None when it can)."""
    missing = missing_binaries()
    if missing:
        return (f"SLURM/munge binaries missing ({', '.join(missing)}): install them with "
                "`nemotron-train local-cluster install` (as root), which `make test` runs")
    if os.geteuid() != 0:
        return "not root: a local cluster needs root for network namespaces and slurmd"
    return None


def install(timeout: float = 900.0) -> bool:
    """apt-get install slurm-wlm and munge when missing (root only), without starting the
    packages' system-wide services. False when everything was there already."""
    missing = missing_binaries()
    if not missing:
        return False
    if os.geteuid() != 0:
        raise LaunchError(f"missing {', '.join(missing)}; installing {' '.join(APT_PACKAGES)} needs root")
    if find_binary("apt-get") is None:
        raise LaunchError(f"missing {', '.join(missing)} and apt-get is not available: install {' '.join(APT_PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *APT_PACKAGES, "iproute2", "util-linux"]
    with _no_service_starts():
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:  # stale or absent package lists: refresh once and retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout)
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise LaunchError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-2000:]}")
    still = missing_binaries()
    if still:
        raise LaunchError(f"installed {' '.join(APT_PACKAGES)} but still missing: {', '.join(still)}")
    return True


class _no_service_starts:
    """Package scripts would start system-wide munged/slurmd; a temporary policy-rc.d (the
    Debian mechanism for this) forbids it, unless one is already in place."""

    path = Path("/usr/sbin/policy-rc.d")

    def __enter__(self) -> None:
        self.created = not self.path.exists()
        if self.created:
            self.path.write_text("#!/bin/sh\nexit 101\n")
            self.path.chmod(0o755)

    def __exit__(self, *exc: object) -> None:
        if self.created:
            self.path.unlink(missing_ok=True)


def wait_until(predicate: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.3) -> T:
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _run(*cmd: str, check: bool = True, timeout: float = 30, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise LaunchError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _controller_name() -> str:
    """The short hostname: slurmctld insists on running on `SlurmctldHost`."""
    return socket.gethostname().split(".")[0]


def _pick_subnet(tag: bytes) -> ipaddress.IPv4Network:
    """A private /24 derived from the state directory, clear of every address and route here."""
    used = _run("ip", "-4", "-o", "addr", "show", check=False).stdout + _run("ip", "-4", "route", check=False).stdout
    taken = [ipaddress.ip_network(m, strict=False) for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", used)]
    for n in range(256):
        net = ipaddress.ip_network(f"10.{200 + (tag[0] + n) % 50}.{(tag[1] + 7 * n) % 256}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise LaunchError("no free 10.x.y.0/24 subnet for the cluster bridge")


@dataclass
class ClusterState:
    """What `up` made, recorded in <state dir>/cluster.json so `status`/`down` find it."""

    state_dir: str
    nodes: int
    cpus_per_node: int
    tag: str
    subnet: str
    controller: str
    bridge: str
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    namespaces: List[str] = field(default_factory=list)
    veths: List[str] = field(default_factory=list)
    addresses: Dict[str, str] = field(default_factory=dict)  # node name -> address
    pids: Dict[str, int] = field(default_factory=dict)  # daemon (munged, slurmctld, slurmd-nodeK) -> pid

    @property
    def root(self) -> Path:
        return Path(self.state_dir)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def node_names(self) -> List[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def save(self) -> None:
        tmp = self.root / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.root / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> Optional["ClusterState"]:
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------------- up


def up(nodes: int, cpus_per_node: Optional[int] = None, state_dir: Optional[Path] = None, timeout: float = 60.0,
       gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> ClusterState:
    """Start the cluster (or find it running); a failed start removes everything it made."""
    root = Path(state_dir or default_state_dir()).resolve()
    if nodes < 1 or nodes > 250:
        raise LaunchError(f"--nodes {nodes}: use 1..250")
    if gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {gpus_per_node}: use 0 (no GRES) or more")
    reason = why_unavailable()
    if reason:
        raise LaunchError(f"cannot start a local cluster: {reason}")
    running = ClusterState.load(root)
    if running is not None:
        if is_up(running):
            if (running.nodes, running.gpus_per_node) != (nodes, gpus_per_node):
                raise LaunchError(f"a {running.nodes}-node cluster with {running.gpus_per_node} GPU(s) per node is "
                                  f"already up in {root}; `nemotron-train local-cluster down --state-dir {root}` first")
            return running
        down(root)  # left over from a crash: clear it, then start afresh
    cpus = cpus_per_node or os.cpu_count() or 1
    tag = hashlib.sha1(str(root).encode()).digest()
    st = ClusterState(state_dir=str(root), nodes=nodes, cpus_per_node=cpus, gpus_per_node=gpus_per_node, tag=tag.hex()[:5],
                      subnet=str(_pick_subnet(tag)), controller=_controller_name(), bridge=f"ntc{tag.hex()[:5]}br")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    st.save()  # from here on `down` can undo whatever was made
    try:
        _make_network(st)
        _write_config(st)
        _start_daemons(st, timeout)
    except BaseException as exc:
        logs = daemon_logs(st)
        down(root)
        if isinstance(exc, (LaunchError, TimeoutError, OSError, subprocess.SubprocessError)):
            raise LaunchError(f"local cluster did not come up (everything it made is removed): {exc}\n{logs}") from None
        raise
    return st


def _make_network(st: ClusterState) -> None:
    net = ipaddress.ip_network(st.subnet)
    hosts = list(net.hosts())
    bridge_addr = hosts[-1]
    _run("ip", "link", "add", st.bridge, "type", "bridge")
    st.veths.append(st.bridge)
    st.save()
    _run("ip", "addr", "add", f"{bridge_addr}/{net.prefixlen}", "dev", st.bridge)
    _run("ip", "link", "set", st.bridge, "up")
    for i, name in enumerate(st.node_names, start=1):
        ns, veth = f"ntc{st.tag}-{name}", f"ntc{st.tag}v{i}"
        _run("ip", "netns", "add", ns)
        st.namespaces.append(ns)
        st.save()
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", CLUSTER_IFNAME, "netns", ns)
        st.veths.append(veth)
        st.save()
        _run("ip", "link", "set", veth, "master", st.bridge)
        _run("ip", "link", "set", veth, "up")
        st.addresses[name] = str(hosts[i - 1])
        _run("ip", "-n", ns, "addr", "add", f"{hosts[i - 1]}/{net.prefixlen}", "dev", CLUSTER_IFNAME)
        _run("ip", "-n", ns, "link", "set", CLUSTER_IFNAME, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    st.addresses[st.controller] = str(bridge_addr)
    # Every node resolves every node's name (and the controller's) to its bridge address.
    (st.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in st.addresses.items()))
    for name in st.node_names:
        (st.root / "spool" / f"slurmd-{name}").mkdir(parents=True, exist_ok=True)
    st.save()


def _detected_memory() -> int:
    out = _run(find_binary("slurmd") or "slurmd", "-C", check=False).stdout
    memory = int(dict(re.findall(r"(\w+)=(\S+)", out)).get("RealMemory", 1024))
    return max(256, int(memory * 0.9))


def _write_config(st: ClusterState) -> None:
    root, memory = st.root, _detected_memory()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o755)  # munged wants its socket directory traversable
    gres = f"Gres=gpu:{st.gpus_per_node} " if st.gpus_per_node else ""
    nodes = "".join(
        f"NodeName={name} NodeHostname={name} NodeAddr={st.addresses[name]} CPUs={st.cpus_per_node} "
        f"RealMemory={memory} {gres}State=UNKNOWN\n"
        for name in st.node_names
    )
    (root / "gres.conf").write_text(_gres_conf(st))
    (root / "plugstack.conf").write_text("")  # keep a system plugstack (e.g. pyxis) out
    st.conf.write_text(textwrap.dedent(f"""\
        # Written by `nemotron-train local-cluster up`; removed by `down`.
        ClusterName=ntlocal
        SlurmctldHost={st.controller}({st.addresses[st.controller]})
        SlurmctldPort={_free_port()}
        SlurmdPort={_free_port()}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        AuthInfo=socket={root}/munge/munge.socket
        CredType=cred/munge
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool/slurmd-%n
        SlurmctldPidFile={root}/state/slurmctld.pid
        SlurmdPidFile={root}/spool/slurmd-%n.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd-%n.log
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
        GresTypes=gpu
        SlurmdParameters=config_overrides
        ReturnToService=2
        MinJobAge=3600
        KillWait=15
        InactiveLimit=0
        """) + nodes + "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")


def _gres_conf(st: ClusterState) -> str:
    """gres.conf of count-only GPUs: no autodetection (no NVML here), and a placeholder
    device file per GPU, because slurmd drops a GPU without `File=` (see the module doc)."""
    if not st.gpus_per_node:
        return "AutoDetect=off\n"
    gpus = st.root / "gpus"
    gpus.mkdir(exist_ok=True)
    for index in range(st.gpus_per_node):
        path = gpus / f"gpu{index}"  # slurm reads the GPU's index from the trailing digits
        if not path.exists():
            try:
                os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
            except PermissionError:  # no CAP_MKNOD: a plain file counts too (slurmd logs an error)
                path.touch()
    return f"AutoDetect=off\nName=gpu Count={st.gpus_per_node} File={gpus}/gpu[0-{st.gpus_per_node - 1}]\n"


def _spawn(st: ClusterState, name: str, cmd: Sequence[str]) -> None:
    with open(st.root / "log" / f"{name}.stdout", "ab") as out:
        # Own session: the daemons outlive this command and a Ctrl-C of whoever started it.
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=st.env(), start_new_session=True)
    st.pids[name] = proc.pid
    st.save()


def _start_daemons(st: ClusterState, timeout: float) -> None:
    munge = st.root / "munge"
    _spawn(st, "munged", [
        find_binary("munged") or "munged", "--foreground", "--force", f"--socket={munge / 'munge.socket'}",
        f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
        f"--log-file={st.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}",
    ])
    wait_until(lambda: _alive(st, "munged") and (munge / "munge.socket").exists(), 20, "munged's socket")
    _spawn(st, "slurmctld", [find_binary("slurmctld") or "slurmctld", "-D", "-f", str(st.conf)])
    for name, ns in zip(st.node_names, st.namespaces):
        # The node's own hostname (a UTS namespace), /etc/hosts (a private mount namespace)
        # and network (its netns): jobs on it see `hostname` = nodeK and reach the others
        # over the bridge only. Not `ip netns exec`: it remounts /sys, hiding the cgroup
        # tree slurmd reads.
        _spawn(st, f"slurmd-{name}", [
            "unshare", "--uts", "--mount", "sh", "-c",
            f'mount --bind "$1" /etc/hosts && hostname {name} && exec nsenter --net="$2" "$0" -D -f "$3" -N {name}',
            find_binary("slurmd") or "slurmd", str(st.root / "hosts"), str(NETNS_RUN / ns), str(st.conf),
        ])
    wait_until(lambda: _all_idle(st), timeout, f"{st.nodes} node(s) to be idle in sinfo")


def _pid_alive(pid: int, name: str) -> bool:
    """Whether `pid` is still the daemon started as `name` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    # A dead child of `up` is a zombie; an empty command line is a process in the middle of
    # an exec (unshare -> sh -> nsenter -> slurmd), still ours.
    return state != "Z" and (not cmdline or name.split("-")[0] in cmdline)


def _alive(st: ClusterState, name: str) -> bool:
    if not _pid_alive(st.pids.get(name, -1), name):
        raise LaunchError(f"{name} is not running; see {st.root / 'log'}")
    return True


def _sinfo(st: ClusterState) -> Dict[str, str]:
    result = _run(find_binary("sinfo") or "sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20, env=st.env())
    return dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) >= 2) if result.returncode == 0 else {}


def _all_idle(st: ClusterState) -> bool:
    for name in st.pids:
        _alive(st, name)
    states = _sinfo(st)
    return all(states.get(name) == "idle" for name in st.node_names)


def is_up(st: ClusterState) -> bool:
    try:
        return all(_pid_alive(pid, name) for name, pid in st.pids.items()) and bool(st.pids) and bool(_sinfo(st))
    except (OSError, subprocess.SubprocessError):
        return False


def daemon_logs(st: ClusterState, tail: int = 3000) -> str:
    parts = []
    for path in sorted((st.root / "log").glob("*")):
        parts.append(f"----- {path.name} -----\n{path.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- down


def down(state_dir: Optional[Path] = None) -> bool:
    """Stop the cluster in `state_dir` and remove all it made; False if there was none."""
    root = Path(state_dir or default_state_dir()).resolve()
    st = ClusterState.load(root)
    if st is None:
        return False
    if st.pids.get("slurmctld") and is_up(st):
        _cancel_jobs(st)
    for name in reversed(list(st.pids)):  # slurmd's, slurmctld, munged
        _stop_pid(st.pids[name], name)
    for ns in st.namespaces:  # job processes a dead slurmd left behind
        pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    for ns in st.namespaces:
        _run("ip", "netns", "del", ns, check=False)
    for link in st.veths:  # veths usually go with their namespace; the bridge never does
        if Path(f"/sys/class/net/{link}").exists():
            _run("ip", "link", "del", link, check=False)
    shutil.rmtree(root, ignore_errors=True)
    return True


def _cancel_jobs(st: ClusterState) -> None:
    env = st.env()
    ids = _run("squeue", "-h", "-o", "%i", check=False, env=env).stdout.split()
    if ids:
        _run("scancel", *ids, check=False, env=env)
        try:
            wait_until(lambda: not _run("squeue", "-h", "-o", "%i", check=False, env=env).stdout.split(), 30, "cancelled jobs to end")
        except TimeoutError:
            pass  # the daemons go next, then whatever runs in the namespaces is killed


def _stop_pid(pid: int, name: str, grace: float = 10.0) -> None:
    if not _pid_alive(pid, name):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _pid_alive(pid, name), grace, f"{name} to stop", interval=0.1)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- command line


def status_text(st: ClusterState) -> str:
    states = _sinfo(st)
    lines = [f"local cluster in {st.root}: {st.nodes} node(s), controller {st.controller} ({st.addresses[st.controller]})"]
    for name in st.node_names:
        lines.append(f"  {name}  {st.addresses[name]}  {states.get(name, 'down?')}  "
                     f"({st.cpus_per_node} CPUs, {st.gpus_per_node} count-only GPUs, {CLUSTER_IFNAME})")
    lines.append(f"export SLURM_CONF={st.conf}")
    return "\n".join(lines)


def node_command(st: ClusterState, node: str, command: Sequence[str]) -> List[str]:
    """`command` run on `node`: its network, hostname and /etc/hosts (those of its slurmd)."""
    if node not in st.node_names:
        raise LaunchError(f"no node {node!r}; nodes: {', '.join(st.node_names)}")
    pid = st.pids[f"slurmd-{node}"]
    return ["nsenter", f"--target={pid}", "--net", "--uts", "--mount", "--", *command]


def register(subparsers) -> None:
    p = subparsers.add_parser("local-cluster", help="a real multi-node SLURM cluster on this machine (root)",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("up", "start it (idempotent)"), ("status", "nodes, addresses and SLURM_CONF"),
                         ("down", "stop it and remove everything it made"), ("exec", "run a command on one node"),
                         ("install", "apt-get install slurm-wlm and munge when missing (root)")):
        a = sub.add_parser(action, help=text)
        if action != "install":
            a.add_argument("--state-dir", type=Path, default=None, help="where it lives (default: a directory in the temp dir)")
        if action == "up":
            a.add_argument("--nodes", type=int, required=True)
            a.add_argument("--cpus-per-node", type=int, default=None, help="CPUs each node offers SLURM (default: all)")
            a.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE,
                           help=f"count-only GPUs (GRES gpu, no devices) each node offers (default: {DEFAULT_GPUS_PER_NODE})")
        if action == "exec":
            a.add_argument("node", help="node1 ... nodeN")
            a.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.action == "install":
        print(f"{' '.join(APT_PACKAGES)}: {'installed' if install() else 'already installed'}")
        return 0
    if args.action == "up":
        st = up(args.nodes, args.cpus_per_node, args.state_dir, gpus_per_node=args.gpus_per_node)
        print(status_text(st))
        return 0
    if args.action == "down":
        gone = down(args.state_dir)
        print("local cluster stopped and removed" if gone else "no local cluster there")
        return 0
    st = ClusterState.load(Path(args.state_dir or default_state_dir()).resolve())
    if st is None or not is_up(st):
        print(f"no local cluster is up in {args.state_dir or default_state_dir()}", file=sys.stderr)
        return 1
    if args.action == "status":
        print(status_text(st))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LaunchError("no command to run: put it after `--`")
    cmd = node_command(st, args.node, command)
    os.execvpe(cmd[0], cmd, st.env())
    return 0  # not reached
