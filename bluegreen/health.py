"""HTTP health checks: proving a new instance ready, and watching the serving one."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bluegreen.config import HealthConfig

log = logging.getLogger(__name__)


class NotHealthy(Exception):
    """An instance did not become healthy; the message says what the last check saw."""


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str
    status: int = 0
    elapsed: float = 0.0


async def probe(port: int, path: str, timeout: float, host: str = "localhost") -> Probe:
    """One GET of http://127.0.0.1:port/path with ``Host: host`` (apps that check the Host
    header, as Django's ALLOWED_HOSTS does, refuse an address); healthy means a 2xx status
    line within timeout."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                         "User-Agent: bluegreen-health\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return Probe(False, f"no answer within {timeout:g} s", elapsed=time.monotonic() - started)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return Probe(False, reason, elapsed=time.monotonic() - started)
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.monotonic() - started
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return Probe(False, f"not an HTTP answer: {line[:60]!r}", elapsed=elapsed)
    status = int(parts[1])
    if 200 <= status < 300:
        return Probe(True, f"HTTP {status}", status, elapsed)
    return Probe(False, f"HTTP {status} from {path}", status, elapsed)


async def wait_healthy(
    port: int,
    path: str,
    settings: HealthConfig,
    unit_failure: Callable[[], Awaitable[str | None]],
    host: str = "localhost",
) -> int:
    """Probe until ``healthy_threshold`` consecutive passes; return the number of probes.

    ``unit_failure`` is asked before each probe and returns why the instance's unit is no
    longer running (or None): a crashed instance fails at once, not at the deadline.
    Raises NotHealthy at ``settings.deadline`` (a probe begun before it gets its full timeout).
    """
    deadline = time.monotonic() + settings.deadline
    passes = probes = 0
    last = "no check ran"
    while True:
        failure = await unit_failure()
        if failure:
            raise NotHealthy(f"the instance stopped: {failure}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NotHealthy(f"not healthy within {settings.deadline:g} s; last check: {last}")
        result = await probe(port, path, settings.timeout, host)
        probes += 1
        last = result.reason
        passes = passes + 1 if result.ok else 0
        if passes >= settings.healthy_threshold:
            return probes
        await asyncio.sleep(min(settings.interval, max(0.0, deadline - time.monotonic())))


class Monitor:
    """Watches the serving instances; reports a change of health to ``on_change``.

    The release is healthy while one of its instances passes its checks: ``on_change(healthy,
    reason)`` is called when every instance has failed ``unhealthy_threshold`` checks in a
    row, and again when one passes after that. ``on_probe(port, result)``, if given, hears
    each instance's every check.
    """

    def __init__(
        self,
        path: str,
        settings: HealthConfig,
        target: Callable[[], tuple[int, ...]],
        on_change: Callable[[bool, str], Awaitable[None]],
        host: str = "localhost",
        on_probe: Callable[[int, Probe], Awaitable[None]] | None = None,
    ) -> None:
        self.path = path
        self.host = host
        self.settings = settings
        self.target = target
        self.on_change = on_change
        self.on_probe = on_probe
        self.healthy = True
        self.reason = ""
        self.failures = 0
        self.failures_total = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            ports = self.target()
            if not ports:
                self.failures = 0
                continue
            results = await asyncio.gather(*(probe(port, self.path, self.settings.timeout,
                                                   self.host) for port in ports))
            if ports != self.target():
                continue  # switched while probing: the result says nothing about the new one
            if self.on_probe is not None:
                for port, result in zip(ports, results, strict=True):
                    await self.on_probe(port, result)
            await self.record(best(ports, results))

    async def record(self, result: Probe) -> None:
        if result.ok:
            self.failures = 0
            if not self.healthy:
                self.healthy, self.reason = True, result.reason
                await self.on_change(True, result.reason)
            return
        self.failures += 1
        self.failures_total += 1
        self.reason = result.reason
        if self.healthy and self.failures >= self.settings.unhealthy_threshold:
            self.healthy = False
            await self.on_change(False, f"{self.failures} failed checks in a row: {result.reason}")

    def reset(self) -> None:
        self.healthy, self.reason, self.failures = True, "", 0


def best(ports: tuple[int, ...], results: list[Probe]) -> Probe:
    """The release's result: a passing instance's, or what each instance failed with."""
    passed = [result for result in results if result.ok]
    if passed or len(results) == 1:
        return (passed or results)[0]
    return Probe(False, "; ".join(f"port {port}: {result.reason}"
                                  for port, result in zip(ports, results, strict=True)))
