"""Who may change anything over the HTTP API, decided from the socket a request came in on.

bluegreen-api.socket listens on a unix socket (SOCKET_PATH, root:bluegreen, mode 0660) and on
TCP (api.listen). On the unix socket the kernel tells who is calling (SO_PEERCRED and
SO_PEERGROUPS): root and members of the group bluegreen may change things, as over D-Bus. On
TCP anyone on the host can connect, app instances and builds included, so every change needs
the api-token credential as a Bearer token, whatever address the socket has.
"""

from __future__ import annotations

import grp
import hmac
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import TypeGuard

SOCKET_PATH = "/run/bluegreen/api.sock"
GROUP = "bluegreen"
TOKEN_FILE = "/etc/bluegreen/api-token"

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_MAX_GROUPS_BYTES = 1024  # what Python's getsockopt reads at most: 256 groups


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] | None  # None: the kernel's list did not fit (see member_of)

    def describe(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            name = str(self.uid)
        return f"user {name} (uid {self.uid}, pid {self.pid})"

    def member_of(self, group: grp.struct_group) -> bool:
        if self.gid == group.gr_gid:
            return True
        if self.groups is not None:
            return group.gr_gid in self.groups
        try:
            return pwd.getpwuid(self.uid).pw_name in group.gr_mem
        except KeyError:
            return False


def peer(sock: socket.socket) -> Peer:
    """The credentials of the peer of unix socket ``sock``."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS_BYTES)
    except OSError:  # ERANGE: more groups than fit; ENOPROTOOPT: a kernel before 4.13
        groups = None
    else:
        groups = frozenset(struct.unpack(f"={len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
    return Peer(pid, uid, gid, groups)


def privileged(caller: Peer, group: str | None = None) -> bool:
    """Root, or a member of ``group`` (GROUP; a group that does not exist has no members)."""
    if caller.uid == 0:
        return True
    try:
        return caller.member_of(grp.getgrnam(group or GROUP))
    except KeyError:
        return False


def is_unix(sock: object) -> TypeGuard[socket.socket]:
    return isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX


def token_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header carries ``token`` as a Bearer token (constant time)."""
    return hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())
