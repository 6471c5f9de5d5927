"""Which host and address each rank runs on: the network side of a multi-node job.

`interface_address` reads an interface's IPv4 address (what `launch.socket_ifname` names);
`rank_hosts` gathers (host, address) from every rank so rank 0 can print one line that
shows where the job's ranks really are, the first thing to look at when a multi-node
rendezvous or collective hangs.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nemotron_train.errors import LaunchError

_SIOCGIFADDR = 0x8915  # linux/sockios.h: get an interface's protocol address
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_address(ifname: str) -> str:
    """The IPv4 address of network interface `ifname` on this host; LaunchError if it has none."""
    if not ifname or len(ifname) > 15:
        raise LaunchError(f"{ifname!r} is not a network interface name")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()))
        except OSError as exc:
            names = ", ".join(name for _, name in socket.if_nameindex())
            raise LaunchError(
                f"network interface {ifname!r} has no IPv4 address on {socket.gethostname()} ({exc.strerror}); "
                f"interfaces here: {names}"
            ) from None
    return socket.inet_ntoa(packed[20:24])


def socket_ifname_env(ifname: Optional[str]) -> Dict[str, str]:
    """The environment that pins gloo's and NCCL's sockets to `ifname` (empty for None)."""
    return {name: ifname for name in SOCKET_IFNAME_VARS} if ifname else {}


def this_host() -> Tuple[str, str]:
    """(short hostname, the address this rank's collectives use): the socket interface's
    address when one is pinned, else what the hostname resolves to."""
    host = socket.gethostname().split(".")[0]
    ifname = next((os.environ[v] for v in SOCKET_IFNAME_VARS if os.environ.get(v)), None)
    if ifname:
        try:
            return host, interface_address(ifname.split(",")[0])
        except LaunchError:
            pass
    try:
        return host, socket.gethostbyname(socket.gethostname())
    except OSError:
        return host, "?"


def rank_hosts(group: Any = None) -> List[Tuple[str, str]]:
    """(host, address) of every rank of `group`, in rank order (a collective)."""
    import torch.distributed as dist

    mine = this_host()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return [tuple(item) for item in gathered]


def describe_rank_hosts(hosts: Sequence[Tuple[str, str]]) -> str:
    """`ranks by host: node1 (10.0.0.1) 0-7; node2 (10.0.0.2) 8-15`."""
    by_host: Dict[Tuple[str, str], List[int]] = {}
    for rank, key in enumerate(hosts):
        by_host.setdefault(tuple(key), []).append(rank)
    parts = [f"{host} ({addr}) {_ranges(ranks)}" for (host, addr), ranks in by_host.items()]
    return f"ranks by host: {'; '.join(parts)}"


def _ranges(ranks: List[int]) -> str:
    """[0, 1, 2, 5] -> `0-2,5`."""
    out, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [-1]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(out)
