"""The forwarder's drain closes the old listener under a process blocked in accept(), which then
leaves by itself, and leaves the new listener on the same port alone."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bluegreen import forwardhook, sockdiag
from tests.unit.test_sockdiag import needs_net_admin

# A stand-in for socat: listens (SO_REUSEPORT) on a port of its own, blocks in accept(), and
# exits with the errno accept() fails with.
ACCEPTOR = """\
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", 0))
sock.listen()
print(sock.getsockname()[1], flush=True)
try:
    sock.accept()
except OSError as exc:
    sys.exit(exc.errno)
"""


@pytest.fixture
def acceptor() -> Iterator[subprocess.Popen[str]]:
    """The old forwarder (the port it listens on is the first line of its output)."""
    process = subprocess.Popen([sys.executable, "-c", ACCEPTOR], stdout=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.fixture
def sibling(acceptor: subprocess.Popen[str]) -> Iterator[socket.socket]:
    """The new forwarder's listener, which joins the port after the old one, as at a switch."""
    assert acceptor.stdout is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", int(acceptor.stdout.readline())))
    sock.listen()
    yield sock
    sock.close()


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_the_old_listener_is_destroyed_and_its_owner_leaves_by_itself(
        acceptor: subprocess.Popen[str], sibling: socket.socket) -> None:
    needs_net_admin()
    port = sibling.getsockname()[1]
    (old,) = [s.inode for s in sockdiag.listeners(port) if s.inode != inode_of(sibling)]
    closed: set[int] = set()
    forwardhook.close_listeners(acceptor.pid, closed)
    assert closed == {old}
    assert acceptor.wait(timeout=10) == errno.EINVAL  # no signal: accept() failed
    assert [s.inode for s in sockdiag.listeners(port)] == [inode_of(sibling)]
    forwardhook.close_listeners(acceptor.pid, closed)  # nothing left to do, no error


def test_without_sock_destroy_the_listener_is_shut_down_through_a_copy(
        acceptor: subprocess.Popen[str], sibling: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(sock: sockdiag.TcpSocket, attempts: int = 64) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(sockdiag, "destroy", unsupported)
    closed: set[int] = set()
    forwardhook.close_listeners(acceptor.pid, closed)
    assert len(closed) == 1
    assert acceptor.wait(timeout=10) == errno.EINVAL
    assert [s.inode for s in sockdiag.listeners(sibling.getsockname()[1])] == [inode_of(sibling)]


def test_copy_socket_refuses_a_socket_that_does_not_listen() -> None:
    with socket.socket() as unconnected, pytest.raises(OSError) as failed:
        forwardhook.copy_socket(os.getpid(), unconnected.fileno())
    assert failed.value.errno == errno.EINVAL


def test_the_old_listener_gets_no_new_connection_once_steered(
        acceptor: subprocess.Popen[str], sibling: socket.socket) -> None:
    port = sibling.getsockname()[1]
    fds = sockdiag.socket_fds(acceptor.pid)
    (old,) = sockdiag.held_by(sockdiag.listeners(port), fds)
    copy, how = forwardhook.steer_away(acceptor.pid, old, fds[old.inode])
    assert copy is not None and how == "new connections steered to the new listener"
    copy.close()
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        sibling.settimeout(5)
        for _ in clients:  # every one of them waits on the sibling, none on the old listener
            sibling.accept()[0].close()
        assert acceptor.poll() is None  # its accept() is still waiting
    finally:
        for client in clients:
            client.close()


def listener_on(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    sock.settimeout(5)
    return sock


def only_one_gets(port: int, listeners: list[socket.socket], count: int = 20) -> socket.socket:
    """Connect ``count`` clients; return the listener that got them all (or fail)."""
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        got = []
        for sock in listeners:
            sock.setblocking(False)
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                got.append(sock)
            sock.settimeout(5)
        assert len(got) == count
        assert len(set(got)) == 1, [listeners.index(sock) for sock in got]
        return got[0]
    finally:
        for client in clients:
            client.close()


def test_with_several_instances_the_drain_steers_to_a_new_listener_every_time(
        acceptor: subprocess.Popen[str]) -> None:
    """Two old forwarders, then two new ones, on one port (app.instances = 2): while each old
    one drains in turn, every new connection goes to a new listener, never to an old one."""
    needs_net_admin()
    assert acceptor.stdout is not None
    port = int(acceptor.stdout.readline())
    old2, new1, new2 = (listener_on(port) for _ in range(3))
    try:
        (old1,) = [s for s in sockdiag.listeners(port) if s.inode not in
                   {inode_of(old2), inode_of(new1), inode_of(new2)}]
        copy, _ = forwardhook.steer_away(acceptor.pid, old1, sockdiag.socket_fds(acceptor.pid)[old1.inode])
        assert copy is not None
        copy.close()
        assert only_one_gets(port, [old2, new1, new2]) is new2
        forwardhook.close_listeners(acceptor.pid, set())  # the first old one leaves
        assert acceptor.wait(timeout=10) == errno.EINVAL
        (old2_diag,) = [s for s in sockdiag.listeners(port) if s.inode == inode_of(old2)]
        copy, _ = forwardhook.steer_away(os.getpid(), old2_diag, old2.fileno())
        assert copy is not None
        copy.close()
        # "The second listener" would be old2 itself now (the kernel moved new2 into old1's slot).
        assert only_one_gets(port, [old2, new1, new2]) is new1
    finally:
        for sock in (old2, new1, new2):
            sock.close()


def test_when_no_way_works_close_listeners_says_why(
        acceptor: subprocess.Popen[str], sibling: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(sockdiag, "destroy", refused)
    monkeypatch.setattr(forwardhook, "copy_socket", refused)
    with pytest.raises(OSError) as failed:
        forwardhook.close_listeners(acceptor.pid, set())
    assert "SOCK_DESTROY: Operation not permitted; no copy" in str(failed.value)
    assert acceptor.poll() is None  # untouched: the caller decides on a signal


def test_usage_errors() -> None:
    assert forwardhook.main(["drain", "1"]) == 2
    assert forwardhook.main(["drain", "x", "30"]) == 2
    assert forwardhook.main(["stop", "1", "30"]) == 2
