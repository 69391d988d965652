"""The built-in forwarder (bluegreen-proxy@PORT.service), an alternative to socat.

One asyncio process relays every connection from the public port to 127.0.0.1:PORT; socat
forks a process per connection, which costs most of its throughput when every request comes
on a new connection. It behaves like the socat forwarder at a switch: it listens with
SO_REUSEPORT beside the old forwarder, and on SIGTERM it closes its listener (the kernel
moves the queued connections to the other listener, net.ipv4.tcp_migrate_req=1) and exits
once the connections in flight are done, or after BLUEGREEN_DRAIN_TIMEOUT seconds.

    python3 -m bluegreen.proxy PUBLIC_PORT TARGET_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys

BUFFER = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


class Proxy:
    def __init__(self, public_port: int, target_port: int, backlog: int = 1024) -> None:
        self.public_port = public_port
        self.target_port = target_port
        self.backlog = backlog
        self.connections: set[asyncio.Task[None]] = set()
        self.server: asyncio.base_events.Server | None = None

    async def _relay(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, server_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
        finally:
            client_writer.close()
            server_writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # counted, so that a drain can wait for it
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)
        await self._relay(reader, writer)

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, host=None, port=self.public_port, reuse_port=True, reuse_address=True,
            backlog=self.backlog, family=socket.AF_INET)

    async def drain(self, timeout: float) -> int:
        """Stop listening, wait for the connections in flight; return how many were cut."""
        if self.server is not None:
            self.server.close()
        pending = set(self.connections)
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
        return len(pending)


def _notify(message: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon

        daemon.notify(message)


async def serve(public_port: int, target_port: int, drain_timeout: float) -> int:
    proxy = Proxy(public_port, target_port)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _notify(f"READY=1\nSTATUS=Forwarding port {public_port} to 127.0.0.1:{target_port}")
    await stop.wait()
    _notify("STOPPING=1\nSTATUS=Draining")
    cut = await proxy.drain(drain_timeout)
    if cut:
        print(f"drain: {cut} connections still open after {drain_timeout:g} s; cut", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(arg.isdigit() for arg in argv):
        print("usage: python3 -m bluegreen.proxy PUBLIC_PORT TARGET_PORT", file=sys.stderr)
        return 2
    drain_timeout = float(os.environ.get("BLUEGREEN_DRAIN_TIMEOUT", "30"))
    with contextlib.suppress(ImportError):
        import uvloop  # Debian's python3-uvloop: a faster event loop, when installed

        uvloop.install()
    return asyncio.run(serve(int(argv[0]), int(argv[1]), drain_timeout))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
