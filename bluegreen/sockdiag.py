"""TCP sockets of this network namespace, asked of the kernel over NETLINK_SOCK_DIAG.

The kernel filters by state and port (inet_diag bytecode), so a question costs the same with
twenty thousand TIME_WAIT sockets around as with none; /proc/net/tcp would list them all.
Used to pick a free port, to see that a new forwarder listens, to count the connections an old
instance still serves, and to close an old forwarder's listener from the kernel side (destroy)
once new connections go elsewhere (attach_reuseport_program, see forwarders/reuseport.py).
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOCK_DESTROY = 21
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3

_NLMSGHDR = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBBI48s")  # inet_diag_req_v2: family, protocol, ext, pad, states, id
_MESSAGE = struct.Struct("=BBBB2s2s16s16sIQIIIII")  # inet_diag_msg
_SOCKET_ID = struct.Struct(">HH16s16s")  # inet_diag_sockid up to the interface: ports, addresses
_SOCKET_ID_TAIL = struct.Struct("=IQ")  # its interface index and cookie
SO_ATTACH_REUSEPORT_CBPF = 51


def _return(index: int) -> bytes:
    """One classic BPF instruction, BPF_RET | BPF_K: "the listener at ``index`` of the group"."""
    return struct.pack("=HBBI", 0x06, 0, 0, index)


_SECOND_LISTENER = _return(1)
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
    interface: int = 0
    cookie: int = 0  # the kernel's id of the socket, which destroy() checks

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.local_address else socket.AF_INET


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


def _socket(fields: tuple[Any, ...]) -> TcpSocket:
    """A TcpSocket from the fields of an inet_diag_msg."""
    (family, state, _timer, _retrans, sport, dport, src, dst, interface, cookie,
     _expires, rqueue, _wqueue, uid, inode) = fields
    return TcpSocket(_address(family, src), int.from_bytes(sport, "big"), _address(family, dst),
                     int.from_bytes(dport, "big"), TcpState(state), rqueue, uid, inode, interface, cookie)


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
                yield _socket(_MESSAGE.unpack_from(data, offset + _NLMSGHDR.size))
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


def _raw_address(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address).ljust(16, b"\0")


def destroy_request(sock: TcpSocket, remote_port: int, sequence: int = 1) -> bytes:
    """A SOCK_DESTROY request naming ``sock`` by its addresses and cookie, with ``remote_port``
    in place of its own (see destroy)."""
    family = sock.family
    sockid = _SOCKET_ID.pack(sock.local_port, remote_port, _raw_address(family, sock.local_address),
                             _raw_address(family, sock.remote_address))
    sockid += _SOCKET_ID_TAIL.pack(sock.interface, sock.cookie)
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES, sockid)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK,
                          sequence, 0) + body


def _acknowledgement(data: bytes) -> int:
    """The error code of a netlink acknowledgement (0: done, else a negative errno)."""
    _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink answer of type {kind}")
    (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
    return int(code)


def destroy(sock: TcpSocket, attempts: int = 64) -> None:
    """Close ``sock`` from the kernel side, as ``ss -K`` does (sock_diag SOCK_DESTROY).

    A destroyed listener stops at once: the kernel moves the connections queued on it to
    another listener of its SO_REUSEPORT group (net.ipv4.tcp_migrate_req=1), and its owner's
    accept() fails with EINVAL. Needs CAP_NET_ADMIN and a kernel built with
    CONFIG_INET_DIAG_DESTROY (OSError EPERM, EOPNOTSUPP otherwise).

    The kernel looks the socket up by its addresses, as if a packet came from the remote
    address and port given, and then checks the cookie: among listeners sharing a port with
    SO_REUSEPORT, the one it finds is picked by a hash of that remote port. ``ss -K`` gives
    the listener's own (0) and so reaches one listener of the group only; here other remote
    ports are tried until the pick is this socket. FileNotFoundError (ENOENT): gone, or never
    picked in ``attempts`` tries.
    """
    ports = range(attempts) if sock.state == TcpState.LISTEN else [sock.remote_port]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        for sequence, remote_port in enumerate(ports, start=1):
            nl.sendto(destroy_request(sock, remote_port, sequence), (0, 0))
            code = _acknowledgement(nl.recv(1 << 16))
            if code == 0:
                return
            if code != -errno.ENOENT:
                raise OSError(-code, os.strerror(-code))
    raise FileNotFoundError(errno.ENOENT, f"no such socket (inode {sock.inode})")


# How long a steered listener is kept open for the handshakes already begun on it: above a
# round trip on loopback or a LAN, and not noticed in a drain.
STEER_GRACE = 0.1


def prefer_second_listener(sock: socket.socket) -> None:
    """Make the SO_REUSEPORT group of listening ``sock`` give every new connection to the
    listener that joined it second, for as long as the group has two (with one, the kernel
    falls back to its hash, which picks that one). The kernel keeps the program with the
    group, and so for every later switch too.

    A group joined in turn (old forwarder, then new) keeps that order, and the new one takes
    the index the old one leaves: at a switch, the second listener is always the new one.

    Why: closing a listener while the kernel completes a handshake on it can reset that
    connection. tcp_v4_rcv finds the listener still listening (so it does not migrate the
    request), then inet_csk_reqsk_queue_add finds it closed and drops the new connection.
    Once no new connection reaches the old listener, a moment later it has no handshake left.
    """
    attach_reuseport_program(sock, _SECOND_LISTENER)


def attach_reuseport_program(sock: socket.socket, code: bytes) -> None:
    """Set the classic BPF program (instructions of 8 bytes, see reuseport.program) of the
    SO_REUSEPORT group of listening ``sock``."""
    buffer = array.array("B", code)
    program = struct.pack("@HP", len(code) // 8, buffer.buffer_info()[0])  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)


def parse_socket_link(target: str) -> int | None:
    """The inode of a socket from a /proc/PID/fd link to it ("socket:[12345]"), else None."""
    if target.startswith("socket:[") and target.endswith("]") and target[8:-1].isdigit():
        return int(target[8:-1])
    return None


def socket_fds(pid: int | str = "self") -> dict[int, int]:
    """The sockets process ``pid`` holds open: {inode: descriptor}, read from /proc/PID/fd.

    Reading another user's descriptors takes CAP_SYS_PTRACE. FileNotFoundError: no such process.
    """
    found: dict[int, int] = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            inode = parse_socket_link(os.readlink(f"{directory}/{name}"))
        except FileNotFoundError:  # closed meanwhile
            continue
        if inode is not None:
            found[inode] = int(name)
    return found


def held_by(candidates: list[TcpSocket], inodes: Iterable[int]) -> list[TcpSocket]:
    """The sockets among ``candidates`` whose inode is one of ``inodes`` (a process's own)."""
    wanted = set(inodes)
    return [sock for sock in candidates if sock.inode and sock.inode in wanted]


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
