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
        if not ipaddress.ip_address(c.laddr.ip).is_loopback:
            bad.append((c.pid, c.laddr.ip, c.laddr.port))
    return bad
