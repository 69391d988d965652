"""The built-in forwarder's drain: no connection it accepted is lost, however late it came."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from bluegreen import sockdiag
from bluegreen.forwarders.proxy import Proxy
from tests.unit.test_sockdiag import needs_net_admin

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:
    pass


async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read(100)
    await asyncio.sleep(0.2)  # a request in flight during the drain
    writer.write(data.upper())
    await writer.drain()
    writer.close()


async def accept_then_drain(clients: list[socket.socket], iterations: int) -> int:
    """Connections wait in the proxy's accept queue until the loop has accepted them all;
    ``iterations`` more turns of the loop later (their handlers may not exist yet), the drain
    begins, as on a SIGTERM."""
    target = await asyncio.start_server(echo_upper, "127.0.0.1", 0)
    proxy = Proxy(0, target.sockets[0].getsockname()[1])
    await proxy.start()
    assert proxy.listener is not None
    port = proxy.listener.getsockname()[1]
    for client in clients:
        client.connect(("127.0.0.1", port))  # completed by the kernel, queued on the listener
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)  # the whole request: the relay ends once answered
    while sockdiag.listeners(port)[0].rx_queue:
        await asyncio.sleep(0)
    for _ in range(iterations):
        await asyncio.sleep(0)
    cut = await proxy.drain(10)
    target.close()
    return cut  # then asyncio.run cancels what is left, as serve() returning does


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("iterations", [0, 1, 2, 3])
def test_a_connection_accepted_just_before_the_drain_is_served(loop: str, iterations: int) -> None:
    clients = [socket.socket() for _ in range(3)]
    try:
        runner = asyncio.Runner(loop_factory=LOOPS[loop])
        with runner:
            cut = runner.run(accept_then_drain(clients, iterations))
        assert cut == 0
        for client in clients:
            client.settimeout(5)
            answer = b""
            while chunk := client.recv(100):
                answer += chunk
            # b"" here: accepted by the proxy, then dropped with its loop (or reset)
            assert answer == b"PING"
    finally:
        for client in clients:
            client.close()


def test_a_listener_closed_under_the_proxy_stops_it() -> None:
    """As after ss -K: accept() fails; the proxy stops watching it and asks to be stopped."""
    needs_net_admin()

    async def scenario() -> Proxy:
        stopped = asyncio.Event()
        proxy = Proxy(0, 9, on_failure=stopped.set)
        await proxy.start()
        assert proxy.listener is not None
        (listener,) = sockdiag.listeners(proxy.listener.getsockname()[1])
        sockdiag.destroy(listener)
        await asyncio.wait_for(stopped.wait(), 5)
        assert await proxy.drain(1) == 0
        return proxy

    assert asyncio.run(scenario()).failed


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer "ok" once the client has sent everything: a connection the test keeps open."""
    await reader.read()
    writer.write(b"ok")
    await writer.drain()
    writer.close()


def test_at_max_connections_the_proxy_stops_accepting_until_one_ends() -> None:
    async def scenario() -> None:
        target = await asyncio.start_server(hold, "127.0.0.1", 0)
        proxy = Proxy(0, target.sockets[0].getsockname()[1], max_connections=2)
        await proxy.start()
        assert proxy.listener is not None
        port = proxy.listener.getsockname()[1]
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert len(proxy.connections) == 2 and proxy.full
        assert sockdiag.listeners(port)[0].rx_queue == 1  # the third waits in the queue
        first_reader, first_writer = clients[0]
        first_writer.write_eof()
        assert await first_reader.read() == b"ok"
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert len(proxy.connections) == 2  # the third took the place of the first
        assert sockdiag.listeners(port)[0].rx_queue == 0
        for reader, writer in clients[1:]:
            writer.write_eof()
            assert await reader.read() == b"ok"
        assert await proxy.drain(5) == 0
        target.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("address", "answers"), [
    ("::", {"127.0.0.1": True, "::1": True}),
    ("127.0.0.1", {"127.0.0.1": True, "::1": False}),
    ("::1", {"127.0.0.1": False, "::1": True}),
])
def test_the_proxy_listens_on_its_address_only(address: str, answers: dict[str, bool]) -> None:
    async def scenario() -> dict[str, bool]:
        proxy = Proxy(0, 9, address=address)
        await proxy.start()
        assert proxy.listener is not None
        port = proxy.listener.getsockname()[1]
        reached = {}
        for host in answers:
            try:
                _reader, writer = await asyncio.open_connection(host, port)
            except ConnectionRefusedError:
                reached[host] = False
            else:
                reached[host] = True
                writer.close()
        await proxy.drain(1)
        return reached

    assert asyncio.run(scenario()) == answers


TAKE_OVER = """
import os, socket, sys
from bluegreen.forwarders.proxy import inherited_listener
os.environ["LISTEN_PID"] = str(os.getpid())
found = inherited_listener(int(sys.argv[1]))
print(found.getsockname()[1] if found else None, os.environ.get("LISTEN_FDS"),
      [fd for fd in (3, 4) if os.path.exists(f"/proc/self/fd/{fd}")
       and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")])
"""


def test_a_proxy_takes_over_the_listener_left_in_the_store_and_nothing_else() -> None:
    """systemd passes the stored listener as descriptor 3 (LISTEN_FDS): the proxy listens on
    it, moved off descriptors 3 and 4, and closes what else it was passed."""
    with socket.socket() as stored, socket.socket() as other:
        stored.bind(("127.0.0.1", 0))
        stored.listen()
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = stored.getsockname()[1]

        def as_passed() -> None:  # the child's descriptors 3 and 4, as systemd passes them
            os.dup2(stored.fileno(), 3)
            os.dup2(other.fileno(), 4)

        result = subprocess.run(
            [sys.executable, "-c", TAKE_OVER, str(port)], capture_output=True, text=True,
            env={**os.environ, "LISTEN_FDS": "2"}, preexec_fn=as_passed, close_fds=False,
            check=True)
        # Its own port's listener taken, the environment cleaned, nothing left on 3 and 4.
        assert result.stdout.split() == [str(port), "None", "[]"], result
