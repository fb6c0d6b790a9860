"""Which sockets a process tree listens on (used to prove local mode stays on loopback)."""

from __future__ import annotations

import ipaddress

import psutil


def tree_pids(root_pid: int) -> set[int]:
    try:
        root = psutil.Process(root_pid)
        return {root_pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    # Python 3.11 does not treat IPv4-mapped IPv6 loopback (::ffff:127.0.0.1) as loopback.
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def non_loopback_listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP/UDP socket bound to a non-loopback address by ``pids``."""
    bad = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if c.type == 1 and c.status != psutil.CONN_LISTEN:  # SOCK_STREAM: only listening sockets
            continue
        if c.type == 2 and c.raddr:  # SOCK_DGRAM: a connected UDP socket is not a server
            continue
        if not _is_loopback(c.laddr.ip):
            bad.append((c.pid, c.laddr.ip, c.laddr.port))
    return bad
