"""HTTP health checks: proving a new instance ready, and watching the serving one.

A ``Check`` is what one check of an instance is, as the configuration says; ``Failures``
counts the failed checks in a row against its ``unhealthy_threshold``, alike for the health
monitor (the serving release), the pool (each serving instance) and a deploy's watch (each new
instance).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bluegreen import answers
from bluegreen.config import Config

log = logging.getLogger(__name__)


class NotHealthy(Exception):
    """An instance did not become healthy; the message says what the last check saw."""


# The path checked when app.health_path is not set, and the one asked when the app has none.
HEALTH_PATH = "/health"
ROOT = "/"


@dataclass(frozen=True)
class Check:
    """One health check of an instance: GET ``path`` with ``Host: host`` (apps that check the
    Host header, as Django's ALLOWED_HOSTS does, refuse an address), answered within ``timeout``,
    every ``interval``; ``unhealthy_threshold`` failures in a row make it unhealthy, and a new
    instance is ready after ``healthy_threshold`` passes in a row, within ``deadline``.

    ``strict``: app.health_path is set, and only a 2xx from it is healthy. Otherwise the app
    may have no /health (a published app rarely does): a 404 there sends the check to "/",
    and any answer but a server error proves the app up (``alive``).
    ``forwarded_proto``: the scheme the front tells the app of (X-Forwarded-Proto), so that
    an app that redirects plain http to https answers the check as it answers the front."""

    path: str = HEALTH_PATH
    host: str = "localhost"
    timeout: float = 2.0
    interval: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    deadline: float = 60.0
    strict: bool = True
    forwarded_proto: str = ""

    @classmethod
    def of(cls, config: Config) -> Check:
        """The configuration's check; its Host is app.health_host, else the first of the app's
        domains (the name its ALLOWED_HOSTS holds for sure), else localhost."""
        health, app = config.health, config.app
        host = app.health_host or (app.domains[0] if app.domains else "localhost")
        return cls(app.health_path or HEALTH_PATH, host, health.timeout, health.interval,
                   health.unhealthy_threshold, health.healthy_threshold, health.deadline,
                   strict=bool(app.health_path), forwarded_proto="https" if app.domains else "")

    def alive(self, status: int) -> bool:
        """Whether an answer with ``status`` is healthy. Strict: a 2xx alone. Otherwise any
        answer the app gives without failing: a redirect (to a login page, to https, Django's
        APPEND_SLASH), a request for credentials, a 404 on "/" of an app that serves only
        /api/...; never a 5xx, nor a 400 (a Host the app refuses: its clients' too)."""
        if self.strict:
            return 200 <= status < 300
        return 200 <= status < 500 and status != 400


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str
    path: str = ""  # the path whose answer decided


async def probe(port: int, check: Check) -> Probe:
    """One ``check`` of http://127.0.0.1:port: on its path, or on "/" when it is not strict and
    the app answers 404 on its path."""
    result, status = await _ask(port, check, check.path)
    if check.strict or status != 404 or check.path == ROOT:
        return result
    root, status = await _ask(port, check, ROOT)
    advice = ("" if root.ok else "; set app.health_path to a path the app answers with 2xx "
              "once it is ready")
    return Probe(root.ok, f"{root.reason} (asked as {check.path} answers 404){advice}", ROOT)


async def _ask(port: int, check: Check, path: str) -> tuple[Probe, int | None]:
    """GET ``path``: the probe's result and the status answered (None: no HTTP answer)."""
    timeout, host = check.timeout, check.host
    forwarded = f"X-Forwarded-Proto: {check.forwarded_proto}\r\n" if check.forwarded_proto else ""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{forwarded}"
                         f"User-Agent: {answers.HEALTH_AGENT}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
        answer = await _rest(reader, timeout) if line.split(None, 2)[1:2] == [b"400"] else b""
    except TimeoutError:
        return Probe(False, f"no answer within {timeout:g} s from {path}", path), None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return Probe(False, reason, path), None
    finally:
        if writer is not None:
            writer.close()
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return Probe(False, f"not an HTTP answer: {line[:60]!r}", path), None
    status = int(parts[1])
    if check.alive(status):
        return Probe(True, f"HTTP {status}" if path == check.path and check.strict
                     else f"HTTP {status} from {path}", path), status
    if status == 400:
        return Probe(False, _bad_request(path, host, answer), path), status
    return Probe(False, f"HTTP {status} from {path}", path), status


# What of a 400 answer is read to tell Django's DisallowedHost from another Bad Request.
_ANSWER_BYTES = 16384


async def _rest(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """The head and the start of the body of an answer whose status line was read (what came
    within ``timeout``)."""
    received = b""
    try:
        async with asyncio.timeout(timeout):
            received = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", received)
            wanted = min(int(length[1]) if length else _ANSWER_BYTES, _ANSWER_BYTES)
            received += await reader.readexactly(wanted)
    except asyncio.IncompleteReadError as exc:
        received += exc.partial
    except (TimeoutError, OSError, asyncio.LimitOverrunError):
        pass
    return received


def _bad_request(path: str, host: str, answer: bytes) -> str:
    """Why a check got 400. A GET without a body is refused so mostly for its Host: Django
    answers 400 to a Host its ALLOWED_HOSTS lacks (DisallowedHost, named in the page only with
    DEBUG on)."""
    advice = (f"Host: {host} is not in the app's ALLOWED_HOSTS: add it there, or set "
              "app.health_host to a name it allows")
    if b"DisallowedHost" in answer or b"Invalid HTTP_HOST header" in answer:
        return f"HTTP 400 from {path}: DisallowedHost ({advice})"
    return f"HTTP 400 from {path} (Bad Request: as Django answers when {advice})"


async def wait_healthy(port: int, check: Check,
                       unit_failure: Callable[[], Awaitable[str | None]]) -> Probe:
    """Probe until ``healthy_threshold`` consecutive passes; return the last one.

    ``unit_failure`` is asked before each probe and returns why the instance's unit is no
    longer running (or None): a crashed instance fails at once, not at the deadline.
    Raises NotHealthy at ``check.deadline`` (a probe begun before it gets its full timeout).
    """
    deadline = time.monotonic() + check.deadline
    passes = 0
    last = "no check ran"
    while True:
        failure = await unit_failure()
        if failure:
            raise NotHealthy(f"the instance stopped: {failure}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NotHealthy(f"not healthy within {check.deadline:g} s; last check: {last}")
        result = await probe(port, check)
        last = result.reason
        passes = passes + 1 if result.ok else 0
        if passes >= check.healthy_threshold:
            return result
        await asyncio.sleep(min(check.interval, max(0.0, deadline - time.monotonic())))


def fallback_note(check: Check, passed: Probe) -> str | None:
    """What to tell of a new release found healthy on another path than its check's."""
    if passed.path in ("", check.path):
        return None
    return (f"the app answers 404 on {check.path}: its health is checked on {passed.path} "
            f"({passed.reason.split(' (', 1)[0]}); set app.health_path to a path that answers "
            "2xx once the app is ready to check that instead")


class Failures:
    """The failed checks in a row of one target (an instance, or the serving release)."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def count(self, result: Probe, threshold: int) -> str | None:
        """Count ``result``; return why the target is unhealthy once ``threshold`` checks in
        a row have failed (None while fewer have, or it passed)."""
        if result.ok:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        if self.in_a_row < threshold:
            return None
        return f"{self.in_a_row} failed checks in a row: {result.reason}"

    def reset(self) -> None:
        self.in_a_row = 0


class Monitor:
    """Watches the serving instances; reports a change of health to ``on_change``.

    The release is healthy while one of its instances passes its checks: ``on_change(healthy,
    reason)`` is called when every instance has failed ``unhealthy_threshold`` checks in a
    row, and again when one passes after that. ``on_probe(port, result)``, if given, hears
    each instance's every check.
    """

    def __init__(
        self,
        check: Check,
        current_target: Callable[[], tuple[int, ...]],
        on_change: Callable[[bool, str], Awaitable[None]],
        on_probe: Callable[[int, Probe], Awaitable[None]] | None = None,
    ) -> None:
        self.check = check  # a reload replaces it
        self.current_target = current_target
        self.on_change = on_change
        self.on_probe = on_probe
        self.healthy = True
        self.reason = ""
        self.failures = Failures()
        self.failures_total = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check.interval)
            ports = self.current_target()
            if not ports:
                self.failures.reset()
                continue
            check = self.check
            results = await asyncio.gather(*(probe(port, check) for port in ports))
            if ports != self.current_target():
                continue  # switched while probing: the result says nothing about the new one
            if self.on_probe is not None:
                for port, result in zip(ports, results, strict=True):
                    await self.on_probe(port, result)
            await self.record(best(ports, results))

    async def record(self, result: Probe) -> None:
        unhealthy = self.failures.count(result, self.check.unhealthy_threshold)
        if result.ok:
            if not self.healthy:
                self.healthy, self.reason = True, result.reason
                await self.on_change(True, result.reason)
            return
        self.failures_total += 1
        self.reason = result.reason
        if self.healthy and unhealthy:
            self.healthy = False
            await self.on_change(False, unhealthy)

    def reset(self) -> None:
        self.healthy, self.reason = True, ""
        self.failures.reset()


def best(ports: tuple[int, ...], results: list[Probe]) -> Probe:
    """The release's result: a passing instance's, or what each instance failed with."""
    passed = [result for result in results if result.ok]
    if passed or len(results) == 1:
        return (passed or results)[0]
    return Probe(False, "; ".join(f"port {port}: {result.reason}"
                                  for port, result in zip(ports, results, strict=True)))
