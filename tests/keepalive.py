#!/usr/bin/python3
"""Keep-alive HTTP clients that check and count every request (tests/integration/forwarder_suite.py).

Runs until SIGINT/SIGTERM, then prints a JSON report on stdout. Each client holds one connection
and reuses it the way urllib3 and browsers do:
  - before reusing a connection it looks whether the server closed it meanwhile (the socket is
    readable) and, if so, opens a new one;
  - a request on a *reused* connection that the server closed or reset before any byte of the
    response is sent again, once, on a new connection; nothing else is retried;
  - a response that says ``Connection: close`` ends the connection.

  --busy N      clients sending back to back, alternating GET / and POST /echo with a random body
                (the app answers with the body, checked byte for byte);
  --thinkers N  the same, with 0.3-2.5 s of think time between two requests;
  --streams N   clients reading GET /stream?seconds=S (a long-lived chunked response), each on a
                new connection, one after another, 0.5 s apart; counted apart from the requests,
                and a stream under way when the clients stop is recorded as "stopped".

The report gives, for every client, the releases it saw in order (``segments``: version, first
request's start, last request's end, how many), so that a test can tell how long a client stayed
on the old release after a switch.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

stop = threading.Event()
THINK = (0.3, 2.5)
SLOW = 0.5  # requests that take longer are listed in the report, with how they went
MAX_BODY = 16 * 1024


class Closed(Exception):
    """The connection ended (closed or reset) before any byte of the response."""


class Broken(Exception):
    """The connection ended or failed partway through the response."""


class Stopped(Exception):
    """The clients were told to stop in the middle of a long-lived response."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class Connection:
    """One HTTP/1.1 connection; requests go one at a time."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.received = 0  # bytes of the response being read
        self.answered = 0  # responses read whole on this connection

    def close(self) -> None:
        self.sock.close()

    def dropped(self) -> bool:
        """What urllib3 asks before reusing a pooled connection: is it readable (closed by the
        server, or holding bytes nobody asked for)?"""
        if self.buffer:
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def request(self, method: str, path: str, body: bytes = b"",
                on_data: Any = None) -> Response:
        head = f"{method} {path} HTTP/1.1\r\nHost: bluegreen\r\n"
        if method == "POST":
            head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
        self.received = 0
        try:
            self.sock.sendall(head.encode() + b"\r\n" + body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Closed(f"send: {exc.strerror}") from None
        status, headers = self._head()
        data = self._body(headers, on_data)
        self.answered += 1
        return Response(status, headers, data)

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = None
        if not data:
            what = "reset" if data is None else "closed"
            if self.received == 0:
                raise Closed(what)
            raise Broken(f"{what} after {self.received} bytes of the response")
        self.received += len(data)
        self.buffer += data

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _head(self) -> tuple[int, dict[str, str]]:
        status_line = self._line().decode("latin-1")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1."):
            raise Broken(f"bad status line {status_line!r}")
        headers = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(rest.split()[0]), headers

    def _body(self, headers: dict[str, str], on_data: Any) -> bytes:
        if "content-length" in headers:
            return self._exactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise Broken("a response without a length")  # the app always gives one
        parts: list[bytes] = []
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():  # trailers
                    pass
                return b"".join(parts)
            chunk = self._exactly(size)
            if self._line():
                raise Broken("bad chunk")
            parts.append(chunk)
            if on_data is not None:
                on_data(chunk)


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    retried: int = 0
    retried_ok: int = 0
    connections: int = 0
    dropped: int = 0  # kept-alive connections found closed before a request
    closes: int = 0  # responses that said Connection: close
    versions: Counter[str] = field(default_factory=Counter)
    clients: list[dict[str, Any]] = field(default_factory=list)
    streams: list[list[Any]] = field(default_factory=list)
    slow: list[dict[str, Any]] = field(default_factory=list)


def classify(exc: BaseException) -> str:
    if isinstance(exc, Closed):
        return "closed-before-response"
    if isinstance(exc, Broken):
        return "cut-mid-response"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"other:{type(exc).__name__}"


class Client:
    def __init__(self, args: argparse.Namespace, stats: Stats, name: str, kind: str) -> None:
        self.args = args
        self.stats = stats
        self.name = name
        self.kind = kind
        self.connection: Connection | None = None
        self.random = random.Random(name)
        # The releases seen in order: [version, first start, last end, requests].
        self.segments: list[list[Any]] = []
        self.connects: list[float] = []  # how long each connect() of the current request took

    def connect(self) -> Connection:
        started = time.monotonic()
        connection = Connection(self.args.host, self.args.port, self.args.timeout)
        self.connects.append(round(time.monotonic() - started, 4))
        with self.stats.lock:
            self.stats.connections += 1
        return connection

    def exchange(self, method: str, path: str, body: bytes = b"") -> Response:
        connection = self.connection
        self.connection = None
        if connection is not None and connection.dropped():
            connection.close()
            connection = None
            with self.stats.lock:
                self.stats.dropped += 1
        reused = connection is not None
        if connection is None:
            connection = self.connect()
        try:
            try:
                response = connection.request(method, path, body)
            except Closed:
                connection.close()
                if not reused:
                    raise
                with self.stats.lock:
                    self.stats.retried += 1
                connection = self.connect()
                response = connection.request(method, path, body)
                with self.stats.lock:
                    self.stats.retried_ok += 1
        except BaseException:
            connection.close()
            raise
        if response.closes:
            connection.close()
            with self.stats.lock:
                self.stats.closes += 1
        else:
            self.connection = connection
        return response

    def one(self, number: int) -> None:
        start = time.time()
        version = ""
        self.connects = []
        try:
            if number % 2:
                body = self.random.randbytes(self.random.randrange(MAX_BODY))
                response = self.exchange("POST", "/echo", body)
                version = response.headers.get("x-version", "")
                outcome = "ok" if response.body == body else "bad-echo"
            else:
                response = self.exchange("GET", "/")
                try:
                    version = str(json.loads(response.body)["version"])
                    outcome = "ok"
                except (ValueError, KeyError):
                    outcome = "bad-body"
            if not 200 <= response.status < 300:
                outcome = f"http-{response.status}"
        except (OSError, Closed, Broken) as exc:
            outcome = classify(exc)
        end = time.time()
        with self.stats.lock:
            self.stats.outcomes[outcome] += 1
            if end - start > SLOW:
                self.stats.slow.append({"client": self.name, "start": start, "end": end,
                                        "outcome": outcome, "version": version,
                                        "connects": self.connects})
            if outcome != "ok":
                self.stats.failures.append({"client": self.name, "start": start, "end": end,
                                            "outcome": outcome})
            else:
                self.stats.versions[version] += 1
        if outcome == "ok":
            if self.segments and self.segments[-1][0] == version:
                self.segments[-1][2] = end
                self.segments[-1][3] += 1
            else:
                self.segments.append([version, start, end, 1])

    def run(self, think: bool) -> None:
        number = 0
        while not stop.is_set():
            self.one(number)
            number += 1
            if think and stop.wait(self.random.uniform(*THINK)):
                break
        if self.connection is not None:
            self.connection.close()
        with self.stats.lock:
            self.stats.clients.append({"name": self.name, "kind": self.kind,
                                       "segments": self.segments})

    def stream(self, delay: float) -> None:
        """Long-lived responses one after another; [start, end, outcome, version, bytes]."""
        if stop.wait(delay):
            return
        while not stop.is_set():
            start = time.time()
            received: list[bytes] = []
            outcome = "ok"

            def on_data(chunk: bytes, received: list[bytes] = received) -> None:
                received.append(chunk)
                if stop.is_set():
                    raise Stopped

            try:
                connection = self.connect()
                try:
                    response = connection.request("GET", f"/stream?seconds={self.args.stream_seconds}",
                                                  on_data=on_data)
                finally:
                    connection.close()
                if response.status != 200:
                    outcome = f"http-{response.status}"
            except Stopped:
                outcome = "stopped"
            except (OSError, Closed, Broken) as exc:
                outcome = classify(exc)
            version = b"".join(received).split(b"\n", 1)[0].decode(errors="replace")
            with self.stats.lock:
                self.stats.streams.append([start, time.time(), outcome, version,
                                           sum(map(len, received))])


def report(stats: Stats, started: float) -> dict[str, Any]:
    duration = time.time() - started
    requests = sum(stats.outcomes.values())
    return {
        "duration": duration,
        "requests": requests,
        "succeeded": stats.outcomes.get("ok", 0),
        "failed": requests - stats.outcomes.get("ok", 0),
        "failures_by_kind": {k: v for k, v in stats.outcomes.items() if k != "ok"},
        "failures": sorted(stats.failures, key=lambda f: f["start"])[:50],
        "requests_per_second": requests / duration if duration else 0,
        "retried": stats.retried,
        "retried_ok": stats.retried_ok,
        "connections": stats.connections,
        "dropped_before_reuse": stats.dropped,
        "connection_close_responses": stats.closes,
        "versions": dict(stats.versions),
        "clients": sorted(stats.clients, key=lambda c: c["name"]),
        "streams": sorted(stats.streams),
        "slow": sorted(stats.slow, key=lambda s: s["start"])[:200],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--busy", type=int, default=6)
    parser.add_argument("--thinkers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--stream-seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="per socket operation")
    args = parser.parse_args()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stats = Stats()
    started = time.time()
    threads = [threading.Thread(target=Client(args, stats, f"busy-{i}", "busy").run, args=(False,))
               for i in range(args.busy)]
    threads += [threading.Thread(target=Client(args, stats, f"thinker-{i}", "thinker").run,
                                 args=(True,)) for i in range(args.thinkers)]
    threads += [threading.Thread(target=Client(args, stats, f"stream-{i}", "stream").stream,
                                 args=(i * 0.5,))
                for i in range(args.streams)]
    for thread in threads:
        thread.start()
    while not stop.wait(0.2):
        pass
    for thread in threads:
        thread.join()
    print(json.dumps(report(stats, started)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
