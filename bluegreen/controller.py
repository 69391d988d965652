"""The controller: owns what serves, the deployment in progress and the records.

Every entry point (D-Bus, and through it HTTP and the CLI) asks this object; it alone starts
deployments, so at most one runs. At start-up it reconciles its records with the units that
systemd actually runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bluegreen import forwarder, health, instances
from bluegreen.config import Config
from bluegreen.deploy import Deployer, DeployFailed, Serving
from bluegreen.history import Deployment, History, State, Step, Trigger, finished, with_step
from bluegreen.log import MessageId, fields
from bluegreen.releases import Releases
from bluegreen.repository import Commit, Repository, RepositoryError, validate_ref
from bluegreen.systemd import Systemd

log = logging.getLogger(__name__)


class Busy(Exception):
    """A deployment is already running; the message names it."""


class NotConfigured(Exception):
    pass


class Observer(Protocol):
    def step(self, deployment: Deployment, step: Step, port: int) -> None: ...
    def finished(self, deployment: Deployment) -> None: ...
    def changed(self) -> None: ...


@dataclass(frozen=True)
class Paths:
    state: Path = Path("/var/lib/bluegreen")
    runtime: Path = Path("/run/bluegreen")

    @property
    def database(self) -> Path:
        return self.state / "bluegreen.db"

    @property
    def mirror(self) -> Path:
        return self.state / "repository.git"

    @property
    def releases(self) -> Path:
        return self.state / "releases"


class Controller:
    def __init__(self, config: Config, systemd: Systemd, paths: Paths,
                 notify_status: Callable[[str], None] = lambda text: None) -> None:
        self.config = config
        self.systemd = systemd
        self.paths = paths
        self.history = History(paths.database)
        self.repository = Repository(config.repository.url, config.repository.branch, paths.mirror)
        self.releases = Releases(paths.releases)
        self.deployer = Deployer(config, systemd, self.repository, self.releases, paths.runtime,
                                 self._on_step)
        self.observers: list[Observer] = []
        self.notify_status = notify_status
        self.serving: Serving | None = None
        self.current: Deployment | None = None
        self._preparing: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.monitor = health.Monitor(config.app.health_path, config.health,
                                      self._monitor_target, self._on_health_change)
        self._monitor_task: asyncio.Task[None] | None = None

    # --- what entry points ask -------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.current is not None or self._preparing is not None:
            return "deploying"
        if self.serving is None:
            return "idle"
        return "serving" if self.monitor.healthy else "unhealthy"

    def health(self) -> tuple[bool, str]:
        """Overall health: serving a release that passes its checks."""
        if self.serving is None:
            return False, "no release is serving"
        if not self.monitor.healthy:
            return False, f"the serving release is unhealthy: {self.monitor.reason}"
        return True, f"release {self.serving.release[:12]} serves on port {self.serving.port}"

    def last_deployment(self) -> Deployment | None:
        recent = self.history.recent(1)
        return recent[0] if recent else None

    # --- deploying -------------------------------------------------------------------------

    async def request_deploy(self, ref: str, trigger: Trigger) -> Deployment:
        """Resolve ``ref`` and start deploying it; return the new record at once.

        Raises InvalidRef/UnknownRef/RepositoryError (nothing recorded, nothing changed),
        Busy while another deployment runs, NotConfigured without a repository.
        """
        validate_ref(ref)
        if self.current is not None:
            raise Busy(f"deployment {self.current.id} ({self.current.commit[:12]}) is running")
        if self._preparing is not None:
            raise Busy(f"a deployment of {self._preparing!r} is being prepared")
        if not self.config.repository.url:
            raise NotConfigured("no repository configured: set repository.url in "
                                f"{self.config.source} or TEAM_REPO_URL")
        self._preparing = ref or self.config.repository.branch
        self._changed()
        try:
            commit = await self.repository.resolve(ref)
            deployment = self._begin(ref, trigger, commit)
        finally:
            self._preparing = None
        self._task = asyncio.create_task(self._run(deployment), name=f"deploy-{deployment.id}")
        return deployment

    def _begin(self, ref: str, trigger: Trigger, commit: Commit) -> Deployment:
        serving = self.serving
        deployment = self.history.begin(
            ref or self.config.repository.branch, trigger, commit=commit.sha,
            subject=commit.subject, author=commit.author,
            previous_port=serving.port if serving else 0,
            previous_release=serving.release if serving else "")
        self.current = deployment
        log.info("deployment %d started: %s %s (%s) by %s", deployment.id, commit.short,
                 commit.subject, deployment.ref, trigger,
                 extra=fields(message_id=MessageId.DEPLOY_STARTED, deployment_id=deployment.id,
                              release=commit.sha, trigger=trigger))
        self._changed()
        return deployment

    async def _run(self, deployment: Deployment) -> None:
        try:
            record = await self.deployer.deploy(deployment, self.serving)
            assert record.port
            self.serving = Serving(record.port, record.commit)
            self.monitor.reset()
            record = finished(record, State.SUCCEEDED, reason=record.reason)
            log.info("deployment %d succeeded: %s serves on port %d (%.2f s)", record.id,
                     record.commit[:12], record.port, record.duration or 0,
                     extra=fields(message_id=MessageId.DEPLOY_SUCCEEDED, deployment_id=record.id,
                                  release=record.commit, port=record.port))
        except DeployFailed as exc:
            record = finished(self.history.get(deployment.id), State.FAILED,
                              failed_step=exc.step, reason=exc.reason)
            log.error("deployment %d failed at %s: %s", record.id, exc.step, exc.reason,
                      extra=fields(message_id=MessageId.DEPLOY_FAILED, deployment_id=record.id,
                                   release=record.commit, port=record.port or None,
                                   step=exc.step))
        except asyncio.CancelledError:
            record = finished(self.history.get(deployment.id), State.INTERRUPTED,
                              reason="the controller was stopped")
            self._finish(record)
            raise
        except Exception as exc:  # a bug: record it, keep the daemon alive
            log.exception("deployment %d crashed", deployment.id)
            record = finished(self.history.get(deployment.id), State.FAILED,
                              reason=f"internal error: {exc!r}")
        self._finish(record)

    def _finish(self, record: Deployment) -> None:
        self.history.save(record)
        self.current = None
        self._task = None
        for observer in self.observers:
            observer.finished(record)
        self._changed()

    async def _on_step(self, deployment: Deployment, step: Step, port: int) -> Deployment:
        record = with_step(deployment, step)
        self.history.save(record)
        self.current = record
        what = {
            Step.MATERIALIZE: f"materializing release {record.commit[:12]}",
            Step.START: f"starting {instances.unit(port)}",
            Step.HEALTH: f"checking {self.config.app.health_path} on port {port}",
            Step.SWITCH: f"switching port {self.config.ports.public} to port {port}",
            Step.DRAIN: f"draining the old forwarder and instance on port {port}",
            Step.STOP_OLD: f"stopping the old instance {instances.unit(port)}",
        }.get(step, str(step))
        unit = forwarder.unit(port) if step in (Step.SWITCH, Step.DRAIN) else instances.unit(port)
        log.info("deployment %d: %s", record.id, what,
                 extra=fields(deployment_id=record.id, release=record.commit, step=step,
                              port=port or None, unit=unit if port else None))
        self.notify_status(f"Deploying {record.commit[:12]} (deployment {record.id}): {step}")
        for observer in self.observers:
            observer.step(record, step, port)
        return record

    async def wait_idle(self) -> None:
        while self._task is not None:
            await asyncio.wait({self._task})

    def _changed(self) -> None:
        if self.current is None and self._preparing is None:
            if self.serving is not None:
                self.notify_status(f"Serving {self.serving.release[:12]} on port "
                                   f"{self.serving.port} via port {self.config.ports.public}")
            else:
                self.notify_status("Idle: no release serves")
        for observer in self.observers:
            observer.changed()

    # --- health monitoring and recovery ----------------------------------------------------

    def _monitor_target(self) -> int | None:
        return self.serving.port if self.serving and self.current is None else None

    async def _on_health_change(self, healthy: bool, reason: str) -> None:
        self._changed()
        serving = self.serving
        if healthy or serving is None:
            if healthy:
                log.info("the serving release is healthy again: %s", reason)
            return
        log.warning("the serving release %s on port %d is unhealthy: %s", serving.release[:12],
                    serving.port, reason,
                    extra=fields(message_id=MessageId.UNHEALTHY, release=serving.release,
                                 port=serving.port, unit=instances.unit(serving.port)))
        await self.recover(f"unhealthy: {reason}")

    async def recover(self, why: str) -> None:
        """Replace the serving instance with a fresh one of the same release, blue-green."""
        if self.serving is None or self.current is not None:
            return
        log.warning("recovering: redeploying %s because it is %s", self.serving.release[:12], why,
                    extra=fields(message_id=MessageId.RECOVERY, release=self.serving.release))
        try:
            await self.request_deploy(self.serving.release, Trigger.RECOVERY)
        except (Busy, RepositoryError, NotConfigured) as exc:
            log.error("recovery not started: %s", exc)

    # --- start-up and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        """Reconcile with systemd, then make sure something serves."""
        forwarder.write_env(self.paths.runtime, self.config.ports.public, self.config.drain_timeout)
        try:
            if forwarder.ensure_migrate_req():
                log.info("set net.ipv4.tcp_migrate_req=1 (switches keep queued connections)")
        except forwarder.ForwarderError as exc:
            log.error("%s; deployments will fail at the switch", exc)
        self.releases.remove_incomplete()
        await self.reconcile()
        self._monitor_task = asyncio.create_task(self.monitor.run(), name="health-monitor")
        if self.serving is None and self.config.repository.url:
            await self._startup_deploy()
        self._changed()

    async def _startup_deploy(self) -> None:
        last = self.history.last_succeeded()
        ref = last.commit if last and self.releases.exists(last.commit) else ""
        try:
            await self.request_deploy(ref, Trigger.STARTUP)
        except (RepositoryError, Busy, NotConfigured) as exc:
            log.error("nothing serves and no deployment could start: %s", exc)

    async def reconcile(self) -> None:
        """Adopt what systemd runs: one forwarder and its instance serve, the rest is stopped."""
        for record in self.history.mark_interrupted("the controller stopped during this deployment"):
            log.warning("deployment %d was interrupted (controller stopped at step %s)", record.id,
                        record.steps[-1].step if record.steps else "resolve",
                        extra=fields(deployment_id=record.id, release=record.commit))
        targets = await forwarder.targets(self.systemd)
        running = await instances.running_ports(self.systemd)

        def deployment_of(port: int) -> int:
            value = instances.read_env(self.paths.runtime, port).get("BLUEGREEN_DEPLOYMENT_ID", "0")
            return int(value) if value.isdigit() else 0

        live = [port for port in targets if port in running]
        keep = max(live, key=deployment_of) if live else None
        for port in targets:
            if port != keep:
                log.warning("stopping stale forwarder to port %d", port,
                            extra=fields(unit=forwarder.unit(port), port=port))
                await forwarder.drain_stop(self.systemd, port)
        for port in running:
            if port != keep:
                log.warning("stopping orphaned instance on port %d", port,
                            extra=fields(unit=instances.unit(port), port=port))
                await instances.stop(self.systemd, port)
                instances.remove_env(self.paths.runtime, port)
        if keep is not None:
            release = instances.read_env(self.paths.runtime, keep).get("BLUEGREEN_RELEASE", "")
            self.serving = Serving(keep, release)
            log.info("adopted release %s serving on port %d", release[:12], keep,
                     extra=fields(message_id=MessageId.RECONCILED, release=release, port=keep))

    async def stop(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.history.close()
