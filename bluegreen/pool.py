"""The serving release's instances, and which of them the public port reaches.

With app.instances > 1 every instance has a forwarder of its own on the public port. When one
dies (systemd says its unit left "active", or it failed ``unhealthy_threshold`` checks in a
row), its forwarder is drain-stopped at once, in the background (the health monitor that
reported it goes on checking the others meanwhile): new connections go to the others while
systemd restarts it (the unit's Restart=). Once it passes a health check again, its forwarder starts
again. The last instance that takes traffic is never taken out: with nothing else to carry
it, the health monitor and its recovery take over, as with one instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from enum import StrEnum

from bluegreen import health, instances
from bluegreen.config import Config
from bluegreen.forwarders import control
from bluegreen.log import fields
from bluegreen.serving import Serving
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)


class Member(StrEnum):
    IN = "in"  # its forwarder takes connections
    OUT = "out"  # its forwarder is stopped until the instance is healthy again


class Pool:
    def __init__(self, systemd: Systemd, forwarders: control.Forwarders,
                 config_now: Callable[[], Config], is_busy: Callable[[], bool]) -> None:
        self.systemd = systemd
        self.forwarders = forwarders
        self.config_now = config_now  # the settings the serving release was deployed with
        self.is_busy = is_busy  # a deployment or the start-up owns the forwarders meanwhile
        self.members: dict[int, Member] = {}
        self.failures: dict[int, health.Failures] = {}
        self.draining: dict[int, asyncio.Task[None]] = {}  # forwarders being stopped
        self._lock = asyncio.Lock()

    def reset(self, serving: Serving | None, out: Iterable[int] = ()) -> None:
        """``serving`` serves now, every instance taking traffic but those ``out``."""
        down = set(out)
        self.members = {port: Member.OUT if port in down else Member.IN
                        for port in (serving.ports if serving else ())}
        self.failures = {port: health.Failures() for port in self.members}

    def out(self) -> list[int]:
        return sorted(port for port, member in self.members.items() if member == Member.OUT)

    async def instance_state(self, unit: str, state: str) -> None:
        """systemd's news of an instance's unit: one that is no longer active is taken out."""
        port = instances.port_of(unit)
        if port is None or port not in self.members or state in ("active", "reloading"):
            return
        await self.take_out(port, f"{unit} is {state}")

    async def probed(self, port: int, result: health.Probe) -> None:
        """A health check's result: put a healthy instance back, take a failing one out."""
        if port not in self.members:
            return
        unhealthy = self.failures.setdefault(port, health.Failures()).count(
            result, self.config_now().health.unhealthy_threshold)
        if result.ok and self.members[port] == Member.OUT:
            await self.put_back(port)
        elif unhealthy:
            await self.take_out(port, unhealthy)

    async def take_out(self, port: int, why: str) -> None:
        """Take the instance on ``port`` out of the public port; return once that is decided.

        Its forwarder's drain (up to drain_timeout) goes on in the background: the health
        monitor, which calls this, keeps checking the other instances meanwhile."""
        async with self._lock:
            if self.is_busy() or self.members.get(port) != Member.IN:
                return
            if sum(member == Member.IN for member in self.members.values()) < 2:
                return  # the last one: better a sick instance than none
            self.members[port] = Member.OUT
            log.warning("taking the instance on port %d out of the public port: %s", port, why,
                        extra=fields(unit=instances.unit(port), port=port))
            task = asyncio.create_task(self._drain(port), name=f"drain-{port}")
            self.draining[port] = task
            task.add_done_callback(lambda done: self._drained(port, done))

    async def _drain(self, port: int) -> None:
        try:
            await self.forwarders.drain(port, self.config_now())
        except (SystemdError, control.ForwarderError) as exc:
            log.error("the forwarder to port %d is not stopped: %s", port, exc)

    def _drained(self, port: int, task: asyncio.Task[None]) -> None:
        if self.draining.get(port) is task:
            del self.draining[port]
        if not task.cancelled() and task.exception() is not None:
            log.error("the drain of the forwarder to port %d failed", port,
                      exc_info=task.exception())

    async def settled(self) -> None:
        """Wait for the drains under way."""
        while self.draining:
            await asyncio.wait(list(self.draining.values()))

    async def put_back(self, port: int) -> None:
        async with self._lock:
            if self.is_busy() or self.members.get(port) != Member.OUT:
                return
            if port in self.draining:
                return  # its forwarder is still stopping: at a later check
            if await instances.failure(self.systemd, port):
                return  # answered, but its unit is on its way out
            try:
                await self.forwarders.switch_to([port], self.config_now())
            except (SystemdError, control.ForwarderError) as exc:
                log.error("the instance on port %d stays out: its forwarder did not start: %s",
                          port, exc)
                return
            self.members[port] = Member.IN
            log.info("the instance on port %d is healthy again and back on the public port",
                     port, extra=fields(unit=instances.unit(port), port=port))
