from __future__ import annotations

import os
import socket

from bluegreen import netstat, ports
from bluegreen.config import PortRange
from bluegreen.netstat import TcpState


def test_listeners_and_connections_of_real_sockets() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not netstat.bindable(port)
        (listener,) = netstat.listeners(port)
        assert listener.state == TcpState.LISTEN and listener.local_address == "127.0.0.1"
        assert listener.uid == os.getuid() and listener.inode > 0
        assert netstat.served_connections(port) == 0
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert netstat.listeners(port)[0].rx_queue == 1  # waiting to be accepted
            conn, _ = server.accept()
            assert netstat.served_connections(port) == 1
            # the client's own socket is on another local port: not counted for this one
            assert netstat.served_connections(client.getsockname()[1]) == 1
            conn.close()
    assert netstat.listeners(port) == []


def test_ipv6_listeners_are_seen() -> None:
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen()
        (listener,) = netstat.listeners(server.getsockname()[1])
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
        assert [s.local_port for s in netstat.listeners(port)] == [port]


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
