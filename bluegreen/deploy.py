"""The deploy flow: one commit from the repository to serving on the public port.

    materialize the release -> pick a free port -> start bluegreen-app@PORT -> health-check it
    -> start the forwarder to PORT and drain-stop the old forwarder -> wait for the old
    instance's connections to end -> stop the old instance

Until the switch, any failure stops the new instance and the old release keeps serving. After
the switch the new release serves; trouble stopping the old one is logged and left to the
controller's reconciliation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bluegreen import forwarder, health, instances, netstat, ports
from bluegreen.config import Config
from bluegreen.forwarder import ForwarderError
from bluegreen.history import Deployment, State, Step
from bluegreen.instances import InstanceSpec
from bluegreen.log import MessageId, fields
from bluegreen.releases import Releases
from bluegreen.repository import Repository, RepositoryError
from bluegreen.run import CommandError
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    """What the public port reaches: a release running on an instance port."""

    port: int
    release: str


class DeployFailed(Exception):
    def __init__(self, step: Step, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")


# Called at the start of each step with the port it works on; returns the record with the
# step noted (and saved).
StepReporter = Callable[[Deployment, Step, int], Awaitable[Deployment]]

_STEP_ERRORS = (SystemdError, health.NotHealthy, ports.NoFreePort, RepositoryError, CommandError,
                ForwarderError, OSError)


@dataclass
class Deployer:
    config: Config
    systemd: Systemd
    repository: Repository
    releases: Releases
    run_dir: Path
    report: StepReporter

    async def deploy(self, deployment: Deployment, serving: Serving | None) -> Deployment:
        """Run ``deployment`` (its commit already resolved); return the finished record.

        Raises DeployFailed, with the old release still serving, if a step before the switch
        fails; the new instance is stopped by then.
        """
        record = deployment
        step = Step.MATERIALIZE
        new_port: int | None = None
        try:
            record = await self.report(record, step, 0)
            release_dir = await self.releases.materialize(self.repository, record.commit)

            step = Step.START
            new_port = ports.pick(self.config.ports.range, await self.ports_in_use())
            record = await self.report(replace(record, port=new_port), step, new_port)
            instances.write_env(self.run_dir, self.instance_spec(record, release_dir))
            await instances.start(self.systemd, new_port)

            step = Step.HEALTH
            record = await self.report(record, step, new_port)
            await health.wait_healthy(new_port, self.config.app.health_path, self.config.health,
                                      lambda: instances.failure(self.systemd, new_port))

            step = Step.SWITCH
            record = await self.report(record, step, new_port)
            forwarder.ensure_migrate_req()
            await forwarder.start(self.systemd, new_port)
        except _STEP_ERRORS as exc:
            if new_port is not None:
                await self.discard(new_port)
            raise DeployFailed(step, _reason(exc)) from None
        except asyncio.CancelledError:
            if new_port is not None:
                await asyncio.shield(self.discard(new_port))
            raise

        log.info("switched port %d to %s on port %d", self.config.ports.public, record.commit[:12],
                 new_port, extra=fields(message_id=MessageId.DEPLOY_SWITCHED,
                                        deployment_id=record.id, release=record.commit,
                                        port=new_port, unit=forwarder.unit(new_port)))
        if serving is not None and serving.port != new_port:
            record = await self.retire(record, serving.port)
        return replace(record, state=State.SUCCEEDED)

    async def retire(self, record: Deployment, old_port: int) -> Deployment:
        """Drain and stop what served before the switch; problems are noted, not raised."""
        deadline = time.monotonic() + self.config.drain_timeout
        record = await self.report(record, Step.DRAIN, old_port)
        try:
            await forwarder.drain_stop(self.systemd, old_port)
            left = await wait_until_idle(old_port, deadline)
            if left:
                log.warning("%d connections to the old instance on port %d still open after "
                            "drain_timeout (%g s); stopping it anyway", left, old_port,
                            self.config.drain_timeout,
                            extra=fields(deployment_id=record.id, port=old_port))
            record = await self.report(record, Step.STOP_OLD, old_port)
            await instances.stop(self.systemd, old_port)
            instances.remove_env(self.run_dir, old_port)
        except SystemdError as exc:
            log.error("could not retire the instance on port %d: %s", old_port, exc,
                      extra=fields(deployment_id=record.id, port=old_port))
            record = replace(record, reason=f"old instance on port {old_port} not retired: {exc}")
        return record

    async def discard(self, port: int) -> None:
        """Stop an instance that never received traffic."""
        try:
            await instances.stop(self.systemd, port)
        except SystemdError as exc:
            log.error("could not stop the new instance on port %d: %s", port, exc)
        instances.remove_env(self.run_dir, port)

    async def ports_in_use(self) -> set[int]:
        """Ports of every loaded instance or forwarder unit, whatever its state."""
        taken = set()
        for status in await self.systemd.list_units(instances.PATTERN, forwarder.PATTERN):
            port = instances.port_of(status.name) or forwarder.port_of(status.name)
            if port is not None:
                taken.add(port)
        return taken

    def instance_spec(self, record: Deployment, release_dir: Path) -> InstanceSpec:
        assert record.port
        app = self.config.app
        return InstanceSpec(port=record.port, release=record.commit, release_dir=release_dir,
                            wsgi=app.wsgi, workers=app.workers, worker_class=app.worker_class,
                            deployment_id=str(record.id), team=app.team)


async def wait_until_idle(port: int, deadline: float, poll: float = 0.05) -> int:
    """Wait until nothing is connected to the server on ``port``; return what is left."""
    while True:
        left = netstat.served_connections(port)
        if left == 0 or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(poll)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)
