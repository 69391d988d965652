"""The built-in forwarder, an alternative to socat. Runs in a process of its own,
bluegreen-proxy@PORT.service (``python3 -m bluegreen.forwarders.proxy``), never in the controller.

One asyncio process relays every connection from the public port to 127.0.0.1:PORT; socat
forks a process per connection, which costs most of its throughput when every request comes
on a new connection. It behaves like the socat forwarder at a switch: it listens with
SO_REUSEPORT beside the old forwarder, and on SIGTERM it closes its listener (the kernel
moves the queued connections to the other listener, net.ipv4.tcp_migrate_req=1) and exits
once the connections in flight are done, or after BLUEGREEN_DRAIN_TIMEOUT seconds. It listens
on BLUEGREEN_PUBLIC_ADDRESS ("::": both stacks) and, like socat's max-children, stops accepting
while BLUEGREEN_MAX_CONNECTIONS connections are open (the others wait in the queue). Unlike
socat, it closes its listener itself, in a callback of its loop, never between accepting a
connection and counting it: every connection it accepted is served. Before closing it, it
steers new connections to the new forwarder, as the socat forwarder's stop hook does.

Its listener outlives it when it dies: it keeps the listener in the unit's file descriptor
store (FDSTORE=1, FileDescriptorStoreMax=), and the next proxy systemd starts takes it over
(LISTEN_FDS) instead of binding anew. Meanwhile the port stays bound by the forwarder's user,
and connections wait in its queue. A drain shuts the listener down rather than only closing
its descriptor, which would leave the stored copy listening.

    python3 -m bluegreen.forwarders.proxy PUBLIC_PORT TARGET_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable

from bluegreen import sockdiag

BUFFER = 256 * 1024
STORED = "listener"  # FDNAME= of the listener in the unit's file descriptor store


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
    """The listener and the connections in flight.

    It accepts by itself rather than through asyncio.start_server, so that a connection is
    counted in the same callback that accepts it: the drain then waits for every connection
    accepted before the listener closed. (With start_server, asyncio 3.11 hands each accepted
    socket to a task of its own before the handler runs, and drops it if the server was
    closed meanwhile; uvloop defers it by a loop turn too.)
    """

    def __init__(self, public_port: int, target_port: int, backlog: int = 1024,
                 on_failure: Callable[[], object] = lambda: None, address: str = "0.0.0.0",
                 max_connections: int = 1024) -> None:
        self.public_port = public_port
        self.target_port = target_port
        self.backlog = backlog
        self.address = address  # "::": both stacks
        self.max_connections = max_connections  # beyond: wait in the listen queue, as with socat
        self.full = False
        self.on_failure = on_failure  # called when the listener fails (closed under us, say)
        self.failed = False
        self.connections: set[asyncio.Task[None]] = set()
        self.listener: socket.socket | None = None

    async def _relay(self, client: socket.socket) -> None:
        try:
            client_reader, client_writer = await asyncio.open_connection(sock=client)
        except OSError:
            client.close()
            return
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

    def _accept(self) -> None:
        """The listener is readable: accept what waits, each with its relay task at once."""
        assert self.listener is not None
        for _ in range(self.backlog):
            if len(self.connections) >= self.max_connections:
                asyncio.get_running_loop().remove_reader(self.listener.fileno())
                self.full = True
                return
            try:
                client, _address = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # The listener stays readable: stop watching it, for a while or for good.
                asyncio.get_running_loop().remove_reader(self.listener.fileno())
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    print(f"accept: {exc.strerror}; pausing 0.1 s", file=sys.stderr)
                    asyncio.get_running_loop().call_later(0.1, self._resume)
                else:
                    print(f"accept: {exc.strerror}; listening no more", file=sys.stderr)
                    self.failed = True
                    self.on_failure()
                return
            client.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._relay(client))
            self.connections.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.connections.discard(task)
        if self.full and len(self.connections) < self.max_connections:
            self.full = False
            self._resume()

    def _resume(self) -> None:
        if self.listener is not None and not self.failed:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept)

    async def start(self) -> None:
        self.listener = inherited_listener(self.public_port) or self._bind()
        _notify(f"FDSTOREREMOVE=1\nFDNAME={STORED}")
        _notify(f"FDSTORE=1\nFDNAME={STORED}", [self.listener.fileno()])
        self._resume()

    def _bind(self) -> socket.socket:
        ipv6 = ":" in self.address
        listener = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            if ipv6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, self.address != "::")
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((self.address, self.public_port))
            listener.listen(self.backlog)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        return listener

    async def drain(self, timeout: float) -> int:
        """Stop listening, wait for the connections in flight; return how many were cut.

        New connections go to the new forwarder's listener first, and this one keeps accepting
        for sockdiag.STEER_GRACE, so that no handshake is in progress on it when it closes (see
        sockdiag.prefer_second_listener).
        """
        if self.listener is not None and not self.failed:
            try:
                sockdiag.prefer_second_listener(self.listener)
            except OSError as exc:
                print(f"drain: new connections not steered away ({exc.strerror})", file=sys.stderr)
            await asyncio.sleep(sockdiag.STEER_GRACE)
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            # Shut down, not only closed: the copy in the file descriptor store would listen on.
            # The kernel moves what is queued to the other listener.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RD)
            self.listener.close()
            self.listener = None
        pending = set(self.connections)  # complete: accepting and counting are one callback
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
        return len(pending)


def inherited_listener(port: int) -> socket.socket | None:
    """The listener on ``port`` a predecessor left in the file descriptor store, if systemd
    passed one (LISTEN_FDS); the others passed are closed. It is moved off descriptor 3 on, so
    that the stop hook's ``joined`` tells it from one passed and left alone (as socat does)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    found = None
    for fd in range(3, 3 + count):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        finally:
            os.close(fd)
        try:
            usable = (found is None and sock.type == socket.SOCK_STREAM
                      and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                      and sock.getsockname()[1] == port)
        except OSError:
            usable = False
        if usable:
            sock.setblocking(False)
            found = sock
        else:
            sock.close()
    return found


def _notify(message: str, fds: list[int] | None = None) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon

        daemon.notify(message, fds=fds or [])


async def serve(public_port: int, target_port: int, drain_timeout: float, address: str = "0.0.0.0",
                max_connections: int = 1024) -> int:
    stop = asyncio.Event()
    proxy = Proxy(public_port, target_port, on_failure=stop.set, address=address,
                  max_connections=max_connections)
    await proxy.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _notify(f"READY=1\nSTATUS=Forwarding port {public_port} to 127.0.0.1:{target_port}")
    await stop.wait()
    _notify("STOPPING=1\nSTATUS=Draining")
    cut = await proxy.drain(drain_timeout)
    if cut:
        print(f"drain: {cut} connections still open after {drain_timeout:g} s; cut", file=sys.stderr)
    return 1 if proxy.failed else 0  # a failed listener: systemd starts a new one


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(arg.isdigit() for arg in argv):
        print("usage: python3 -m bluegreen.forwarders.proxy PUBLIC_PORT TARGET_PORT", file=sys.stderr)
        return 2
    drain_timeout = float(os.environ.get("BLUEGREEN_DRAIN_TIMEOUT", "30"))
    address = os.environ.get("BLUEGREEN_PUBLIC_ADDRESS") or "0.0.0.0"
    max_connections = int(os.environ.get("BLUEGREEN_MAX_CONNECTIONS") or "1024")
    with contextlib.suppress(ImportError):
        import uvloop  # Debian's python3-uvloop: a faster event loop, when installed

        uvloop.install()
    return asyncio.run(serve(int(argv[0]), int(argv[1]), drain_timeout, address, max_connections))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
