"""The drain flag for ASGI apps: what gunicornconf.py's pre_request hook does for WSGI, which
gunicorn never calls for uvicorn's worker. Runs inside the instance's workers, around the app
(asgiworker.py puts it there).

Once the instance's drain flag exists (the controller creates it right after a switch):
- every HTTP response carries ``Connection: close``: uvicorn closes the connection after it,
  and a keep-alive client's next request, on a new connection, reaches the new release;
- every open websocket gets a close frame with code 1012 (service restart), within ``poll``
  seconds: browsers and websocket libraries reconnect, to the new release, instead of hanging
  on the old one until drain_timeout cuts them. A websocket accepted while the flag exists is
  closed at once. What the app sends on it afterwards is dropped: its next receive() says it
  is disconnected.

Every HTTP answer is also counted by status class and duration (answers.py), as
gunicornconf.py's post_request hook does for WSGI apps: an app that raises before it answers
counts as the 500 uvicorn then sends.

The flag is one access(2) per response; websockets are watched by one task per worker that
stats the flag every ``poll`` seconds while any is open. Without the flag the app is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bluegreen import answers

_HEALTH_AGENT = answers.HEALTH_AGENT.encode()

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Message, Receive, Send], Awaitable[None]]

CLOSE_CODE = 1012  # service restart: the client is to reconnect
CLOSE_REASON = "new release"
POLL = 0.1


class _Socket:
    """One accepted websocket: its server's send, and whether bluegreen closed it."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.lock = asyncio.Lock()  # one message at a time: the app's or the close
        self.closed = False

    async def close(self) -> None:
        async with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(Exception):  # gone already: nothing to tell
                await self.send({"type": "websocket.close", "code": CLOSE_CODE,
                                 "reason": CLOSE_REASON})


class Drain:
    """The app, with responses and websockets that leave the instance once ``flag`` exists."""

    def __init__(self, app: App, flag: str | None, poll: float = POLL) -> None:
        self.app = app
        self.flag = flag or None
        self.poll = poll
        self.sockets: set[_Socket] = set()
        self.watcher: asyncio.Task[None] | None = None

    def draining(self) -> bool:
        return self.flag is not None and os.access(self.flag, os.F_OK)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send if not self.flag else self._http_send(send))
        elif not self.flag or scope["type"] != "websocket":
            await self.app(scope, receive, send)
        else:
            await self._websocket(scope, receive, send)

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        """The app's answer, counted once it is sent (or the app failed); not so for
        bluegreen's own health checks."""
        if (b"user-agent", _HEALTH_AGENT) in scope.get("headers", ()):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: list[int] = []

        async def noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message.get("status", 0)))
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            answers.record(status[0] if status else None, time.monotonic() - started)

    def _http_send(self, send: Send) -> Send:
        async def drained(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining():
                headers = [(name, value) for name, value in message.get("headers", ())
                           if name.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)
        return drained

    async def _websocket(self, scope: Message, receive: Receive, send: Send) -> None:
        socket = _Socket(send)

        async def tracked(message: Message) -> None:
            async with socket.lock:
                if socket.closed:
                    return  # bluegreen closed it: the app learns so from receive()
                await send(message)
            if message["type"] == "websocket.accept":
                self.sockets.add(socket)
                if self.draining():
                    await socket.close()
                else:
                    self._watch()
            elif message["type"] == "websocket.close":
                socket.closed = True

        try:
            await self.app(scope, receive, tracked)
        finally:
            self.sockets.discard(socket)

    def _watch(self) -> None:
        if self.watcher is None or self.watcher.done():
            self.watcher = asyncio.get_running_loop().create_task(self._close_when_drained())

    async def _close_when_drained(self) -> None:
        while self.sockets:
            if self.draining():
                await asyncio.gather(*(socket.close() for socket in list(self.sockets)))
                return
            await asyncio.sleep(self.poll)
