"""bluegreen.asgidrain: the drain flag for ASGI apps, driven as a server would drive it (pure
ASGI, no server): responses say ``Connection: close`` once the flag exists, and open websockets
get a close frame (1012, service restart) promptly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bluegreen.asgidrain import CLOSE_CODE, Drain

Message = dict[str, Any]
POLL = 0.01


async def hello(scope: Message, receive: Callable[[], Awaitable[Message]],
                send: Callable[[Message], Awaitable[None]]) -> None:
    """An app: HTTP answers with a keep-alive header; a websocket echoes until disconnected."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"Connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"hi"})
    elif scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                # An app that says goodbye late: the server must not see it after the close.
                await send({"type": "websocket.send", "text": "bye"})
                return
            await send({"type": "websocket.send", "text": message.get("text", "")})
    elif scope["type"] == "lifespan":
        assert (await receive())["type"] == "lifespan.startup"
        scope["state"]["ready"] = True
        await send({"type": "lifespan.startup.complete"})


class Peer:
    """The server's side of one connection: what the app sent, and what it receives next."""

    def __init__(self, *incoming: Message) -> None:
        self.sent: list[Message] = []
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        for message in incoming:
            self.incoming.put_nowait(message)

    async def receive(self) -> Message:
        return await self.incoming.get()

    async def send(self, message: Message) -> None:
        if self.sent and self.sent[-1]["type"] == "websocket.close":
            raise AssertionError(f"sent after the close: {message}")
        self.sent.append(message)
        if message["type"] == "websocket.close":  # as uvicorn does: the app learns of it
            self.incoming.put_nowait({"type": "websocket.disconnect", "code": message.get("code")})

    def types(self) -> list[str]:
        return [message["type"] for message in self.sent]


def http_headers(drain: Drain) -> list[tuple[bytes, bytes]]:
    peer = Peer({"type": "http.request", "body": b""})
    asyncio.run(drain({"type": "http"}, peer.receive, peer.send))
    headers: list[tuple[bytes, bytes]] = peer.sent[0]["headers"]
    return headers


def test_responses_keep_the_connection_alive_until_the_flag_exists(tmp_path: Path) -> None:
    flag = tmp_path / "8001.drain"
    drain = Drain(hello, str(flag), poll=POLL)
    assert (b"Connection", b"keep-alive") in http_headers(drain)
    flag.touch()
    headers = http_headers(drain)
    assert [value for name, value in headers if name.lower() == b"connection"] == [b"close"]
    assert (b"content-type", b"text/plain") in headers
    flag.unlink()  # a switch back: keep-alive again
    assert (b"Connection", b"keep-alive") in http_headers(drain)


def test_without_a_flag_nothing_changes() -> None:
    drain = Drain(hello, None, poll=POLL)
    assert (b"Connection", b"keep-alive") in http_headers(drain)


async def echo_session(drain: Drain, peer: Peer) -> asyncio.Task[None]:
    task = asyncio.create_task(drain({"type": "websocket"}, peer.receive, peer.send))
    await peer.incoming.put({"type": "websocket.receive", "text": "one"})
    for _ in range(100):
        if len(peer.sent) >= 2:
            break
        await asyncio.sleep(POLL)
    return task


def test_an_open_websocket_gets_a_close_frame_soon_after_the_flag(tmp_path: Path) -> None:
    flag = tmp_path / "8001.drain"

    async def scenario() -> tuple[Peer, Peer, float]:
        drain = Drain(hello, str(flag), poll=POLL)
        peers = [Peer({"type": "websocket.connect"}) for _ in range(2)]
        tasks = [await echo_session(drain, peer) for peer in peers]
        await asyncio.sleep(5 * POLL)
        assert all(peer.types() == ["websocket.accept", "websocket.send"] for peer in peers)
        flag.touch()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        return peers[0], peers[1], asyncio.get_running_loop().time() - started

    first, second, took = asyncio.run(scenario())
    for peer in (first, second):
        assert peer.types() == ["websocket.accept", "websocket.send", "websocket.close"]
        assert peer.sent[-1]["code"] == CLOSE_CODE == 1012
    assert took < 20 * POLL


def test_a_websocket_accepted_after_the_flag_is_closed_at_once(tmp_path: Path) -> None:
    flag = tmp_path / "8001.drain"
    flag.touch()

    async def scenario() -> Peer:
        peer = Peer({"type": "websocket.connect"})
        await asyncio.wait_for(Drain(hello, str(flag), poll=POLL)(
            {"type": "websocket"}, peer.receive, peer.send), 2)
        return peer

    peer = asyncio.run(scenario())
    assert peer.types() == ["websocket.accept", "websocket.close"]
    assert peer.sent[-1]["code"] == CLOSE_CODE


def test_websockets_stay_open_without_the_flag(tmp_path: Path) -> None:
    async def scenario() -> Peer:
        drain = Drain(hello, str(tmp_path / "8001.drain"), poll=POLL)
        peer = Peer({"type": "websocket.connect"})
        task = await echo_session(drain, peer)
        await asyncio.sleep(10 * POLL)
        assert not task.done()
        await peer.incoming.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, 2)
        return peer

    peer = asyncio.run(scenario())
    assert "websocket.close" not in peer.types()


def test_the_lifespan_reaches_the_app(tmp_path: Path) -> None:
    state: dict[str, Any] = {}
    peer = Peer({"type": "lifespan.startup"})
    asyncio.run(Drain(hello, str(tmp_path / "x.drain"))({"type": "lifespan", "state": state},
                                                         peer.receive, peer.send))
    assert peer.types() == ["lifespan.startup.complete"] and state == {"ready": True}


@pytest.mark.parametrize("scope_type", ["http", "websocket", "lifespan"])
def test_the_app_sees_the_scope_it_was_given(scope_type: str) -> None:
    seen: list[Message] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        seen.append(scope)

    scope = {"type": scope_type, "path": "/"}
    asyncio.run(Drain(app, None)(scope, Peer().receive, Peer().send))
    assert seen == [scope]
