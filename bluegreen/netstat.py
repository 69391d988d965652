"""TCP sockets of this network namespace, read from /proc/net/tcp{,6}.

Used to pick a free port, to see that a forwarder listens, to count the connections an old
instance still serves, and to prove that a port's listener belongs to the unit we started.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

PROC_NET = Path("/proc/self/net")


class TcpState(IntEnum):
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


@dataclass(frozen=True)
class TcpSocket:
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    state: TcpState
    rx_queue: int  # for a listener: connections waiting in its accept queue
    inode: int


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints IPv6 addresses as four host-order 32-bit words
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def parse(text: str) -> Iterator[TcpSocket]:
    """Parse the contents of /proc/net/tcp or /proc/net/tcp6."""
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        local, remote = parts[1].split(":"), parts[2].split(":")
        try:
            state = TcpState(int(parts[3], 16))
        except ValueError:
            continue
        _tx, rx = parts[4].split(":")
        yield TcpSocket(
            local_address=_address(local[0]), local_port=int(local[1], 16),
            remote_address=_address(remote[0]), remote_port=int(remote[1], 16),
            state=state, rx_queue=int(rx, 16), inode=int(parts[9]),
        )


def sockets(proc_net: Path = PROC_NET) -> list[TcpSocket]:
    result: list[TcpSocket] = []
    for name in ("tcp", "tcp6"):
        try:
            result.extend(parse((proc_net / name).read_text()))
        except FileNotFoundError:
            continue
    return result


def listeners(port: int, table: Iterable[TcpSocket] | None = None) -> list[TcpSocket]:
    table = sockets() if table is None else table
    return [s for s in table if s.local_port == port and s.state == TcpState.LISTEN]


_GONE = (TcpState.LISTEN, TcpState.TIME_WAIT, TcpState.CLOSE)


def served_connections(port: int, table: Iterable[TcpSocket] | None = None) -> int:
    """Connections a server on ``port`` still holds: accepted or waiting to be accepted."""
    table = list(sockets() if table is None else table)
    open_ones = sum(1 for s in table if s.local_port == port and s.state not in _GONE)
    return open_ones


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind host:port now (SO_REUSEADDR, as gunicorn and socat use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


def socket_inodes(pids: Iterable[int], proc: Path = Path("/proc")) -> set[int]:
    """Inodes of the sockets the given processes hold open."""
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for name in names:
            try:
                target = os.readlink(fd_dir / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes
