from __future__ import annotations

import os
import socket

from bluegreen import netstat, ports
from bluegreen.config import PortRange
from bluegreen.netstat import TcpState

SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000003 00:00000000 00000000   999        0 4242 1 0
   1: 0100007F:1F40 0100007F:C350 01 00000000:00000000 00:00000000 00000000   999        0 4243 1 0
   2: 0100007F:1F40 0100007F:C351 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0
   3: 0100007F:C350 0100007F:1F40 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0
"""
SAMPLE6 = (
    "  sl  local_address                         remote_address                        st tx_queue "
    "rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 77 1 0\n"
)


def test_parse_proc_net_tcp() -> None:
    table = list(netstat.parse(SAMPLE))
    assert table[0].local_address == "127.0.0.1" and table[0].local_port == 8000
    assert table[0].state == TcpState.LISTEN and table[0].rx_queue == 3 and table[0].inode == 4242
    assert [s.inode for s in netstat.listeners(8000, table)] == [4242]
    # the accepted connection counts; TIME_WAIT and the client side do not
    assert netstat.served_connections(8000, table) == 1
    (six,) = netstat.parse(SAMPLE6)
    assert six.local_address == "::1" and six.local_port == 5000 and six.state == TcpState.LISTEN


def test_real_sockets_of_this_process() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not netstat.bindable(port)
        mine = netstat.socket_inodes([os.getpid()])
        assert any(s.inode in mine for s in netstat.listeners(port))
        assert netstat.served_connections(port) == 0
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = server.accept()
            assert netstat.served_connections(port) == 1
            conn.close()


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
