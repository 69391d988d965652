from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from bluegreen import ports, sockdiag
from bluegreen.config import PortRange
from bluegreen.sockdiag import TcpSocket, TcpState


def test_listeners_and_connections_of_real_sockets() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not sockdiag.bindable(port)
        (listener,) = sockdiag.listeners(port)
        assert listener.state == TcpState.LISTEN and listener.local_address == "127.0.0.1"
        assert listener.uid == os.getuid() and listener.inode > 0
        assert sockdiag.served_connections(port) == 0
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert sockdiag.listeners(port)[0].rx_queue == 1  # waiting to be accepted
            conn, _ = server.accept()
            assert sockdiag.served_connections(port) == 1
            # the client's own socket is on another local port: not counted for this one
            assert sockdiag.served_connections(client.getsockname()[1]) == 1
            conn.close()
    assert sockdiag.listeners(port) == []


def test_ipv6_listeners_are_seen() -> None:
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen()
        (listener,) = sockdiag.listeners(server.getsockname()[1])
        assert listener.local_address == "::1"


def test_the_port_filter_excludes_neighbours() -> None:
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        a.listen()
        port = a.getsockname()[1]
        try:
            b.bind(("127.0.0.1", port + 1))
            b.listen()
        except OSError:
            return  # the neighbour port is taken by someone else; nothing to compare
        assert [s.local_port for s in sockdiag.listeners(port)] == [port]


def test_pick_avoids_taken_and_bound_ports() -> None:
    bound = {8001, 8003}
    picked = {ports.pick(PortRange(8000, 8004), taken={8000, 8002}, bindable=lambda p: p not in bound)
              for _ in range(20)}
    assert picked == {8004}


def test_pick_fails_clearly_when_the_range_is_full() -> None:
    try:
        ports.pick(PortRange(8000, 8001), taken={8000}, bindable=lambda p: False)
    except ports.NoFreePort as exc:
        assert "no free port in 8000-8001" in str(exc)
    else:
        raise AssertionError("NoFreePort not raised")


# --- closing a listener from the kernel side (the forwarder's drain) -----------------------

CAP_NET_ADMIN = 12


def needs_net_admin() -> None:
    """Skip unless this process may SOCK_DESTROY (root under fakeroot may not)."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    if not effective >> CAP_NET_ADMIN & 1:
        pytest.skip("SOCK_DESTROY needs CAP_NET_ADMIN")


def reuseport_listener(port: int = 0, address: str = "127.0.0.1") -> socket.socket:
    """A listener as the forwarders open one ("::": both stacks, as ports.public_address's default)."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    if address == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address, port))
    sock.listen()
    return sock


def test_parse_socket_link() -> None:
    assert sockdiag.parse_socket_link("socket:[123456]") == 123456
    for other in ("pipe:[123456]", "anon_inode:[eventpoll]", "/dev/null", "socket:[]", "socket:[12a]",
                  "socket:123"):
        assert sockdiag.parse_socket_link(other) is None, other


def test_held_by_keeps_only_the_sockets_of_the_given_inodes() -> None:
    def listener(inode: int) -> TcpSocket:
        return TcpSocket("0.0.0.0", 5000, "0.0.0.0", 0, TcpState.LISTEN, 0, 999, inode, 0, inode + 100)

    old, new, unknown = listener(11), listener(22), listener(0)
    assert sockdiag.held_by([old, new, unknown], {11, 33}) == [old]
    assert sockdiag.held_by([old, new, unknown], {0}) == []  # a socket without inode is nobody's
    assert sockdiag.held_by([old, new], []) == []


def test_an_inet_diag_message_gives_interface_and_cookie() -> None:
    raw = sockdiag._MESSAGE.pack(socket.AF_INET, TcpState.LISTEN, 0, 0, (5000).to_bytes(2, "big"),
                                (0).to_bytes(2, "big"), socket.inet_aton("127.0.0.1").ljust(16, b"\0"),
                                bytes(16), 3, 0x1234_5678_9ABC, 0, 7, 1024, 999, 4242)
    sock = sockdiag._socket(sockdiag._MESSAGE.unpack(raw))
    assert sock == TcpSocket("127.0.0.1", 5000, "0.0.0.0", 0, TcpState.LISTEN, 7, 999, 4242, 3,
                             0x1234_5678_9ABC)
    assert sock.family == socket.AF_INET
    assert TcpSocket("::1", 1, "::", 0, TcpState.LISTEN, 0, 0, 1).family == socket.AF_INET6


def test_a_destroy_request_names_the_socket_by_addresses_and_cookie() -> None:
    sock = TcpSocket("127.0.0.1", 5000, "0.0.0.0", 0, TcpState.LISTEN, 0, 999, 4242, 3, 0x1234_5678_9ABC)
    request = sockdiag.destroy_request(sock, remote_port=7, sequence=9)
    length, kind, flags, sequence, _pid = sockdiag._NLMSGHDR.unpack_from(request)
    assert (length, kind, sequence) == (len(request), sockdiag.SOCK_DESTROY, 9)
    assert flags == sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_ACK
    header = sockdiag._NLMSGHDR.size
    family, protocol, _ext, _pad, _states, sockid = sockdiag._REQUEST.unpack_from(request, header)
    assert (family, protocol) == (socket.AF_INET, socket.IPPROTO_TCP)
    sport, dport, src, dst = sockdiag._SOCKET_ID.unpack_from(sockid)
    assert (sport, dport) == (5000, 7)  # ports in network order, the remote one replaced
    assert src == socket.inet_aton("127.0.0.1") + bytes(12) and dst == bytes(16)
    assert sockdiag._SOCKET_ID_TAIL.unpack_from(sockid, sockdiag._SOCKET_ID.size) == (3, 0x1234_5678_9ABC)
    six = TcpSocket("::1", 5000, "::", 0, TcpState.LISTEN, 0, 999, 1, 0, 1)
    assert sockdiag._REQUEST.unpack_from(sockdiag.destroy_request(six, 0), sockdiag._NLMSGHDR.size)[0] \
        == socket.AF_INET6


def test_socket_fds_lists_this_process_sockets_by_inode() -> None:
    with reuseport_listener() as server:
        fds = sockdiag.socket_fds(os.getpid())
        assert fds[os.fstat(server.fileno()).st_ino] == server.fileno()
        (listener,) = sockdiag.held_by(sockdiag.listeners(server.getsockname()[1]), fds)
        assert listener.inode == os.fstat(server.fileno()).st_ino and listener.cookie != 0


def test_socket_fds_of_a_process_that_is_gone() -> None:
    with pytest.raises(FileNotFoundError):
        sockdiag.socket_fds(2**22 + 1)  # above pid_max's highest possible value


@pytest.mark.parametrize("address", ["127.0.0.1", "::"])
def test_destroy_closes_exactly_the_listener_named_among_reuseport_siblings(address: str) -> None:
    """ss -K reaches one listener of a SO_REUSEPORT group only; destroy() reaches each."""
    needs_net_admin()
    first = reuseport_listener(address=address)
    port = first.getsockname()[1]
    group = [first, *(reuseport_listener(port, address) for _ in range(3))]
    try:
        for victim in (group[2], group[0], group[3], group[1]):
            inode = os.fstat(victim.fileno()).st_ino
            before = {s.inode for s in sockdiag.listeners(port)}
            (target,) = [s for s in sockdiag.listeners(port) if s.inode == inode]
            sockdiag.destroy(target)
            assert {s.inode for s in sockdiag.listeners(port)} == before - {inode}
            victim.settimeout(1)
            with pytest.raises(OSError) as failed:
                victim.accept()  # what socat's blocked accept() gets
            assert failed.value.errno == errno.EINVAL
    finally:
        for sock in group:
            sock.close()


def test_destroy_of_a_socket_that_is_gone() -> None:
    needs_net_admin()
    with reuseport_listener() as server:
        (listener,) = sockdiag.listeners(server.getsockname()[1])
    with pytest.raises(FileNotFoundError):
        sockdiag.destroy(listener, attempts=4)
