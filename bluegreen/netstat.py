"""TCP sockets of this network namespace, asked of the kernel over NETLINK_SOCK_DIAG.

The kernel filters by state and port (inet_diag bytecode), so a question costs the same with
twenty thousand TIME_WAIT sockets around as with none; /proc/net/tcp would list them all.
Used to pick a free port, to see that a new forwarder listens, and to count the connections
an old instance still serves.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3

_NLMSGHDR = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBBI48s")  # inet_diag_req_v2: family, protocol, ext, pad, states, id
_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg
_RTATTR = struct.Struct("=HH")
_OP = struct.Struct("=BBH")


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


ALL_STATES = sum(1 << state for state in TcpState)
# Connections a server still holds: accepted, or half-closed and finishing.
SERVED_STATES = ALL_STATES & ~(1 << TcpState.LISTEN | 1 << TcpState.TIME_WAIT | 1 << TcpState.CLOSE)


@dataclass(frozen=True)
class TcpSocket:
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    state: TcpState
    rx_queue: int  # for a listener: connections waiting in its accept queue
    uid: int
    inode: int


def _port_filter(port: int) -> bytes:
    """inet_diag bytecode for "local port == port" (>= port and <= port)."""
    length = 4 * _OP.size
    return b"".join((
        _OP.pack(INET_DIAG_BC_S_GE, _OP.size * 2, length + 4), _OP.pack(0, 0, port),
        _OP.pack(INET_DIAG_BC_S_LE, _OP.size * 2, length - _OP.size * 2 + 4), _OP.pack(0, 0, port),
    ))


def _request(family: int, states: int, port: int | None, sequence: int) -> bytes:
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, states, b"\0" * 48)
    if port is not None:
        bytecode = _port_filter(port)
        body += _RTATTR.pack(_RTATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + body


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def _dump(family: int, states: int, port: int | None) -> Iterator[TcpSocket]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendto(_request(family, states, port, 1), (0, 0))
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if code == 0:
                        return
                    raise OSError(-code, os.strerror(-code))
                (fam, state, _timer, _retrans, sport, dport, src, dst, _if, _cookie,
                 _expires, rqueue, _wqueue, uid, inode) = _MESSAGE.unpack_from(data, offset + _NLMSGHDR.size)
                yield TcpSocket(_address(fam, src), int.from_bytes(sport, "big"), _address(fam, dst),
                                int.from_bytes(dport, "big"), TcpState(state), rqueue, uid, inode)
                offset += (length + 3) & ~3
            if not data:
                return


def sockets(states: int = ALL_STATES, port: int | None = None) -> list[TcpSocket]:
    """TCP sockets (IPv4 and IPv6) in ``states`` (a bit mask), on local ``port`` if given."""
    found: list[TcpSocket] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            found.extend(_dump(family, states, port))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EAFNOSUPPORT):  # no IPv6 in this kernel
                raise
    return found


def listeners(port: int) -> list[TcpSocket]:
    return sockets(1 << TcpState.LISTEN, port)


def served_connections(port: int) -> int:
    """Connections a server on ``port`` still holds: accepted or waiting to be accepted."""
    return len(sockets(SERVED_STATES, port))


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
