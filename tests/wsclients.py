#!/usr/bin/python3
"""Websocket clients that reconnect as browsers' code does, and report every session
(tests/integration/test_asgi_app.py).

Runs until SIGINT/SIGTERM, then prints a JSON report on stdout. Each client (a minimal RFC 6455
client on the standard library) opens ``/ws``, reads the server's JSON hello (its ``version``),
then sends a text message every ``--interval`` seconds and checks that it comes back. When the
server closes the websocket with a close frame, the client answers it and reconnects at once.
Each session is recorded as [version, opened, ended, how it ended, messages echoed], where
"how" is the close frame's code, "stopped" (the clients were told to stop: they closed it),
or a failure: "no-close-frame" (the connection ended without one), "handshake" (no 101),
"bad-echo", "refused", "reset", "timeout".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import struct
import threading
import time
from typing import Any

stop = threading.Event()


class Ended(Exception):
    """The session ended; ``how`` says how (a close code, or a failure's name)."""

    def __init__(self, how: str | int) -> None:
        self.how = how
        super().__init__(str(how))


class WebSocket:
    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise Ended("handshake")

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            raise Ended("reset") from None
        except TimeoutError:
            raise Ended("timeout") from None
        if not data:
            raise Ended("no-close-frame")
        self.buffer += data

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        else:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        try:
            self.sock.sendall(head + mask + masked)
        except (BrokenPipeError, ConnectionResetError):
            raise Ended("reset") from None

    def receive(self) -> str:
        """The next text message; raises Ended at a close frame (after answering it)."""
        while True:
            first, second = self._exactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._exactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._exactly(8))
            payload = self._exactly(length)
            opcode = first & 0x0F
            if opcode == 0x8:  # close: answer it, as the protocol asks, and end
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.send(0x8, payload[:2])
                self.sock.close()
                raise Ended(code)
            if opcode == 0x9:  # ping
                self.send(0xA, payload)
            elif opcode == 0x1:
                return payload.decode()

    def close(self) -> None:
        self.sock.close()


def client(args: argparse.Namespace, number: int, sessions: list[list[Any]],
           lock: threading.Lock) -> None:
    while not stop.is_set():
        opened, version, echoed = time.time(), "", 0
        how: str | int = "stopped"
        try:
            websocket = WebSocket(args.host, args.port, "/ws", args.timeout)
            try:
                version = str(json.loads(websocket.receive())["version"])
                while not stop.wait(args.interval):
                    text = f"{number}-{echoed}"
                    websocket.send(0x1, text.encode())
                    if websocket.receive() != text:
                        how = "bad-echo"
                        break
                    echoed += 1
                else:
                    websocket.send(0x8, struct.pack("!H", 1000))
            finally:
                websocket.close()
        except Ended as ended:
            how = ended.how
        except ConnectionRefusedError:
            how = "refused"
        except OSError as exc:
            how = type(exc).__name__
        with lock:
            sessions.append([version, opened, time.time(), how, echoed, number])
        if not isinstance(how, int) and how != "stopped":
            stop.wait(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between messages")
    parser.add_argument("--timeout", type=float, default=10.0, help="per socket operation")
    args = parser.parse_args()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    sessions: list[list[Any]] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=client, args=(args, number, sessions, lock))
               for number in range(args.clients)]
    for thread in threads:
        thread.start()
    while not stop.wait(0.2):
        pass
    for thread in threads:
        thread.join()
    print(json.dumps({"sessions": sorted(sessions, key=lambda s: (s[5], s[1]))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
