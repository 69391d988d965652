"""Health monitoring of the serving release, and recovery when it fails.

A serving instance that systemd reports dead is taken out of the pool at once (pool.py); a
serving release the health monitor finds unhealthy is redeployed, blue-green, until it is
healthy again, waiting longer after each attempt that did not help.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from bluegreen import health, instances
from bluegreen.config import Config
from bluegreen.history import Deployment, HistoryError, Trigger
from bluegreen.log import MessageId, fields
from bluegreen.pool import Pool
from bluegreen.refusals import Busy, NotConfigured
from bluegreen.release.repository import RepositoryError
from bluegreen.serving import Serving
from bluegreen.tasks import Tasks

log = logging.getLogger(__name__)

# Recovery tries again while the serving release stays unhealthy, waiting longer each time.
RECOVERY_BACKOFF_MAX = 300.0


class App(Protocol):
    """What recovery asks of the controller."""

    @property
    def serving(self) -> Serving | None: ...
    @property
    def current(self) -> Deployment | None: ...
    @property
    def busy(self) -> bool: ...
    @property
    def deployment_task(self) -> asyncio.Task[None] | None: ...
    async def request_deploy(self, ref: str, trigger: Trigger, wait: bool = False) -> Deployment: ...


class Recovery:
    def __init__(self, app: App, pool: Pool, tasks: Tasks, config: Config,
                 changed: Callable[[], None]) -> None:
        self.app = app
        self.pool = pool
        self.tasks = tasks
        self.changed = changed
        self.interval = config.health.interval
        self.monitor = health.Monitor(health.Check.of(config), self.target, self.on_health_change,
                                      pool.probed)
        self.task: asyncio.Task[None] | None = None

    def apply(self, config: Config) -> None:
        """The health settings in effect changed."""
        self.interval = config.health.interval
        self.monitor.check = health.Check.of(config)

    def target(self) -> tuple[int, ...]:
        """The ports the monitor checks: the serving release's, while no deployment runs."""
        serving = self.app.serving
        return serving.ports if serving and self.app.current is None else ()

    def on_unit_state(self, unit: str, state: str) -> None:
        """systemd's news of a unit: a serving instance that died is taken out at once."""
        if instances.port_of(unit) in self.pool.members and state not in ("active", "reloading"):
            self.tasks.spawn(self.pool.instance_state(unit, state), "instance-state",
                             forever=False)

    async def on_health_change(self, healthy: bool, reason: str) -> None:
        self.changed()
        serving = self.app.serving
        if healthy or serving is None:
            if healthy:
                log.info("the serving release is healthy again: %s", reason)
            return
        log.warning("the serving release %s on %s is unhealthy: %s", serving.release[:12],
                    serving.describe(), reason,
                    extra=fields(message_id=MessageId.UNHEALTHY, release=serving.release,
                                 port=serving.port, unit=instances.unit(serving.port)))
        if self.task is None or self.task.done():
            self.task = self.tasks.spawn(self.while_unhealthy(f"unhealthy: {reason}"), "recovery",
                                         forever=False)

    async def while_unhealthy(self, why: str) -> None:
        """Redeploy the serving release until it is healthy again (a successful deployment
        resets the monitor), waiting longer after each attempt that did not help."""
        attempts = 0
        while self._serving_unhealthy():
            if not self.app.busy:
                if attempts:
                    why = f"still unhealthy after {attempts} recovery attempts"
                attempts += 1
                task = await self.recover(why)
                if task is not None:
                    await asyncio.wait([task])
                if not self._serving_unhealthy():
                    return
            delay = min(RECOVERY_BACKOFF_MAX,
                        max(1.0, self.interval) * 2.0 ** max(0, attempts - 1))
            await asyncio.sleep(delay)

    def _serving_unhealthy(self) -> bool:
        return self.app.serving is not None and not self.monitor.healthy

    async def recover(self, why: str) -> asyncio.Task[None] | None:
        """Replace the serving instance with a fresh one of the same release, blue-green;
        return the deployment's task (None if none started)."""
        serving = self.app.serving
        if serving is None or self.app.current is not None:
            return None
        log.warning("recovering: redeploying %s because it is %s", serving.release[:12], why,
                    extra=fields(message_id=MessageId.RECOVERY, release=serving.release))
        try:
            await self.app.request_deploy(serving.release, Trigger.RECOVERY)
        except (Busy, RepositoryError, NotConfigured, HistoryError) as exc:
            log.error("recovery not started: %s", exc)
            return None
        return self.app.deployment_task
