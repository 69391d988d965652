"""fastapi-service: a FastAPI service with a websocket, as a team would write it (see README.md)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse

VERSION = (Path(__file__).parent / "VERSION").read_text().strip()
# What a real service does at startup (a connection pool, a cache warmed): it takes a while,
# and no request may come before it is done.
STARTUP_SECONDS = float(os.environ.get("STARTUP_SECONDS", "0.5"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await asyncio.sleep(STARTUP_SECONDS)
    app.state.started = time.time()
    yield


app = FastAPI(title="fastapi-service", lifespan=lifespan)


def identity(request: Request | WebSocket) -> dict[str, object]:
    # app.state.started exists only once the lifespan startup is done: before, every route fails.
    return {"version": VERSION, "release": os.environ.get("BLUEGREEN_RELEASE", ""),
            "instance": os.environ.get("BLUEGREEN_PORT", ""),
            "started": request.app.state.started}


@app.get("/health")
async def health(request: Request) -> dict[str, object]:
    return {"ok": True, **identity(request)}


@app.get("/")
async def index(request: Request) -> dict[str, object]:
    return identity(request)


@app.post("/echo")
async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, media_type="application/octet-stream",
                    headers={"X-Version": str(identity(request)["version"])})


@app.get("/slow")
async def slow(request: Request, seconds: float = 2.0) -> dict[str, object]:
    await asyncio.sleep(min(seconds, 60.0))
    return {"slept": seconds, **identity(request)}


@app.get("/stream")
async def stream(request: Request, seconds: float = 10.0) -> StreamingResponse:
    """A long-lived response: the version on the first line, then a line every 0.1 s."""
    version = identity(request)["version"]

    async def lines() -> AsyncIterator[bytes]:
        yield f"{version}\n".encode()
        until = time.monotonic() + min(seconds, 600.0)
        while time.monotonic() < until:
            await asyncio.sleep(0.1)
            yield b".\n"

    return StreamingResponse(lines(), media_type="text/plain")


@app.websocket("/ws")
async def chat(websocket: WebSocket) -> None:
    """Says who answers (a JSON hello), then echoes each text message."""
    await websocket.accept()
    await websocket.send_json(identity(websocket))
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
