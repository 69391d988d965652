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

from bluegreen import forwardhook, netstat

# A stand-in for socat: listens beside the test (SO_REUSEPORT) and blocks in accept(); exits
# with the errno accept() fails with.
ACCEPTOR = """\
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
print("listening", flush=True)
try:
    sock.accept()
except OSError as exc:
    sys.exit(exc.errno)
"""


@pytest.fixture
def sibling() -> Iterator[socket.socket]:
    """The new forwarder's listener."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


@pytest.fixture
def acceptor(sibling: socket.socket) -> Iterator[subprocess.Popen[str]]:
    """The old forwarder: another process listening on the sibling's port."""
    process = subprocess.Popen([sys.executable, "-c", ACCEPTOR, str(sibling.getsockname()[1])],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "listening\n"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_the_old_listener_is_destroyed_and_its_owner_leaves_by_itself(
        acceptor: subprocess.Popen[str], sibling: socket.socket) -> None:
    if os.geteuid() != 0:
        pytest.skip("SOCK_DESTROY needs CAP_NET_ADMIN")
    port = sibling.getsockname()[1]
    (old,) = [s.inode for s in netstat.listeners(port) if s.inode != inode_of(sibling)]
    closed: set[int] = set()
    forwardhook.close_listeners(acceptor.pid, closed)
    assert closed == {old}
    assert acceptor.wait(timeout=10) == errno.EINVAL  # no signal: accept() failed
    assert [s.inode for s in netstat.listeners(port)] == [inode_of(sibling)]
    forwardhook.close_listeners(acceptor.pid, closed)  # nothing left to do, no error


def test_without_sock_destroy_the_listener_is_shut_down_through_a_copy(
        acceptor: subprocess.Popen[str], sibling: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(sock: netstat.TcpSocket, attempts: int = 64) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(netstat, "destroy", unsupported)
    closed: set[int] = set()
    forwardhook.close_listeners(acceptor.pid, closed)
    assert len(closed) == 1
    assert acceptor.wait(timeout=10) == errno.EINVAL
    assert [s.inode for s in netstat.listeners(sibling.getsockname()[1])] == [inode_of(sibling)]


def test_shutdown_remote_refuses_a_socket_that_does_not_listen() -> None:
    with socket.socket() as unconnected, pytest.raises(OSError) as failed:
        forwardhook.shutdown_remote(os.getpid(), unconnected.fileno())
    assert failed.value.errno == errno.EINVAL


def test_when_no_way_works_close_listeners_says_why(
        acceptor: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(netstat, "destroy", refused)
    monkeypatch.setattr(forwardhook, "shutdown_remote", refused)
    with pytest.raises(OSError) as failed:
        forwardhook.close_listeners(acceptor.pid, set())
    assert "SOCK_DESTROY: Operation not permitted" in str(failed.value)
    assert acceptor.poll() is None  # untouched: the caller decides on a signal


def test_usage_errors() -> None:
    assert forwardhook.main(["drain", "1"]) == 2
    assert forwardhook.main(["drain", "x", "30"]) == 2
    assert forwardhook.main(["stop", "1", "30"]) == 2
