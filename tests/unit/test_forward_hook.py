"""The forwarder's drain closes the old listener under a process blocked in accept(), which then
leaves by itself, and leaves the new listener on the same port alone."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bluegreen import sockdiag
from bluegreen.forwarders import hook
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


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the hook keeps its record of the port's listeners (not the system's)."""
    monkeypatch.setattr(hook, "RUN_DIR", tmp_path)
    return tmp_path


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
    port = int(acceptor.stdout.readline())
    # Each recorded by the start hook of its forwarder unit, as it starts.
    hook.joined(acceptor.pid, port, 8001)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    hook.joined(os.getpid(), port, 8002)
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
    hook.close_listeners(acceptor.pid, closed)
    assert closed == {old}
    assert acceptor.wait(timeout=10) == errno.EINVAL  # no signal: accept() failed
    assert [s.inode for s in sockdiag.listeners(port)] == [inode_of(sibling)]
    hook.close_listeners(acceptor.pid, closed)  # nothing left to do, no error


def test_without_sock_destroy_the_listener_is_shut_down_through_a_copy(
        acceptor: subprocess.Popen[str], sibling: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(sock: sockdiag.TcpSocket, attempts: int = 64) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(sockdiag, "destroy", unsupported)
    closed: set[int] = set()
    hook.close_listeners(acceptor.pid, closed)
    assert len(closed) == 1
    assert acceptor.wait(timeout=10) == errno.EINVAL
    assert [s.inode for s in sockdiag.listeners(sibling.getsockname()[1])] == [inode_of(sibling)]


def test_copy_socket_refuses_a_socket_that_does_not_listen() -> None:
    with socket.socket() as unconnected, pytest.raises(OSError) as failed:
        hook.copy_socket(os.getpid(), unconnected.fileno())
    assert failed.value.errno == errno.EINVAL


def test_the_old_listener_gets_no_new_connection_once_steered(
        acceptor: subprocess.Popen[str], sibling: socket.socket) -> None:
    port = sibling.getsockname()[1]
    fds = sockdiag.socket_fds(acceptor.pid)
    (old,) = sockdiag.held_by(sockdiag.listeners(port), fds)
    copy, how = hook.steer_away(acceptor.pid, old, fds[old.inode])
    assert copy is not None and how == "new connections go to 1 of the 2 listeners"
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


def test_when_no_way_works_close_listeners_says_why(
        acceptor: subprocess.Popen[str], sibling: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(sockdiag, "destroy", refused)
    monkeypatch.setattr(hook, "copy_socket", refused)
    with pytest.raises(OSError) as failed:
        hook.close_listeners(acceptor.pid, set())
    assert "SOCK_DESTROY: Operation not permitted; no copy" in str(failed.value)
    assert acceptor.poll() is None  # untouched: the caller decides on a signal


def test_usage_errors() -> None:
    assert hook.main(["drain", "1"]) == 2
    assert hook.main(["drain", "x", "30"]) == 2
    assert hook.main(["stop", "1", "30"]) == 2
