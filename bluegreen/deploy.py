"""The deploy flow: one commit from the repository to serving on the public port.

    materialize the release -> verify it (its Python environment, build, import, check) ->
    migrate: the release phase -> start bluegreen-app@PORT on a free port (app.instances of
    them) -> health-check each -> switch: start the forwarder to each PORT -> drain: stop the
    old forwarders, wait for the old instances' connections to end -> watch the new release
    (the old instances still run) -> workers: start the new release's, stop the old one's ->
    stop the old instances

Until the switch, a failure stops the new instances and the old release never stops serving.
If the new release turns unhealthy while watched, traffic goes back to the old instances,
which are still warm. Trouble stopping the old instance is logged and left to the
controller's reconciliation; any other failure past the switch raises Unsettled, and the
controller reads back from systemd which release serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bluegreen import drainflag, health, instances, ports, sockdiag, switchback, workers
from bluegreen.config import DEFAULT_WSGI, Config
from bluegreen.forwarders import control
from bluegreen.forwarders.control import ForwarderError
from bluegreen.history import Deployment, State, Step, Trigger
from bluegreen.instances import InstanceSpec
from bluegreen.log import MessageId, fields
from bluegreen.release import appenv, procfile, transient
from bluegreen.release.procfile import Processes, ProcfileError
from bluegreen.release.releases import Releases
from bluegreen.release.repository import Repository, RepositoryError
from bluegreen.release.venvs import Venvs
from bluegreen.release.verify import Verifier, VerifyFailed
from bluegreen.run import CommandError
from bluegreen.serving import Serving
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)


class DeployFailed(Exception):
    """The deployment did not switch, or switched back; the old release serves."""

    def __init__(self, step: Step, reason: str, state: State = State.FAILED) -> None:
        self.step = step
        self.reason = reason
        self.state = state
        super().__init__(f"{step}: {reason}")


class Unsettled(DeployFailed):
    """A step after the switch failed: either release may carry the traffic now."""


# Called at the start of each step with the port it works on; returns the record with the
# step noted (and saved).
StepReporter = Callable[[Deployment, Step, int], Awaitable[Deployment]]

# Given an app and a public port: the other app whose forwarders serve that port, if any.
PortUser = Callable[[str, int], Awaitable[str | None]]


async def no_port_user(app: str, port: int) -> str | None:
    return None


PORT_ATTEMPTS = 3

_STEP_ERRORS = (SystemdError, health.NotHealthy, ports.NoFreePort, RepositoryError, CommandError,
                ForwarderError, VerifyFailed, transient.CommandFailed, ProcfileError, OSError)


@dataclass
class Deployer:
    config: Config
    systemd: Systemd
    repository: Repository
    releases: Releases
    environments: Venvs
    run_dir: Path
    forwarders: control.Forwarders
    report: StepReporter
    port_user: PortUser = no_port_user
    # Set by an operator's rollback while the new release is watched: switch back at once.
    switch_back_asked: asyncio.Event = field(default_factory=asyncio.Event)
    switch_back_reason: str = ""
    watching: bool = False

    async def deploy(self, deployment: Deployment, serving: Serving | None,
                     skip_release_phase: str | None = None) -> tuple[Deployment, Serving]:
        """Run ``deployment`` (its commit already resolved); return the finished record and
        what serves now. ``skip_release_phase``: why the release, not moving forward, runs no
        release phase (see no_release_phase); None when it runs it.

        Raises DeployFailed, with the old release serving, if a step fails before the switch
        or the new release fails its watch after it; Unsettled if a step fails past the switch
        in a way that leaves unknown which release serves.
        """
        record = deployment
        self.switch_back_asked.clear()
        step = Step.MATERIALIZE
        new_ports: list[int] = []
        staging: Path | None = None
        try:
            record = await self.report(record, step, 0)
            release_dir = self.releases.path(record.commit)
            if not self.releases.exists(record.commit):
                staging = await self.releases.stage(self.repository, record.commit)

            step = Step.VERIFY
            record = await self.report(record, step, 0)
            processes = procfile.processes(staging or release_dir, self.config.release.migrate_command,
                                           self.config.processes)
            wsgi = self.wsgi(record, processes)
            verifier = self.verifier(record)
            environment_dir = await verifier.environment(staging or release_dir)
            if staging is not None:
                await verifier.verify(staging, self.app_environment(record, staging, environment_dir),
                                      wsgi)
                release_dir = self.releases.publish(staging, record.commit)
                staging = None
            env = self.app_environment(record, release_dir, environment_dir)

            if processes.release and skip_release_phase is not None:
                log.info("release phase of %s not run: %s", record.commit[:12], skip_release_phase,
                         extra=fields(deployment_id=record.id, release=record.commit))
            elif processes.release:
                step = Step.MIGRATE
                record = await self.report(record, step, 0)
                try:
                    await transient.run(self.systemd, appenv.command(
                        self.config, "the release phase", "migrate",
                        ["/bin/sh", "-c", processes.release], release_dir, env), record.id)
                except transient.CommandFailed as exc:
                    raise transient.CommandFailed(
                        f"{exc.reason}. If this release is older than the app's data (its "
                        f"migrations behind the database's), `bluegreenctl rollback "
                        f"{record.commit[:12]}` serves it without its release phase") from None

            step = Step.START
            appenv.prepare_data_dir(self.config.app_name)
            for _ in range(self.config.app.instances):
                record = await self.start_instance(record, env, wsgi, new_ports)
                new_ports.append(record.port)
            new = Serving.of(new_ports, record.commit)
            record = replace(record, port=new.port)

            step = Step.HEALTH
            record = await self.report(record, step, new.port)
            await asyncio.gather(*(self.wait_healthy(port) for port in new.ports))

            step = Step.SWITCH
            record = await self.report(record, step, new.port)
            for port in new.ports:
                stranger = await instances.foreign_listener(self.systemd, port)
                if stranger:  # never route traffic to a process bluegreen did not start
                    raise ForwarderError(stranger)
            app, public = self.config.app_name, self.config.ports.public
            user = await self.port_user(app, public)
            if user:  # its listeners would share that app's traffic
                raise ForwarderError(f"port {public} is still served by the app {user}: the app "
                                     f"{app} cannot start its forwarders there")
            control.ensure_migrate_req()
            # The forwarders' settings as this deploy has them (a reload may have changed them).
            ports = self.config.ports
            address = self.forwarders.write_env()
            if not ports.public_address and address == "0.0.0.0" and control.ipv6_available():
                log.info("port %d stays on 0.0.0.0, where it is served now; set "
                         "ports.public_address = \"::\" to add IPv6 (the switch that moves it "
                         "resets the connections queued then)", ports.public)
            await self.forwarders.switch_to(new.ports)
        except _STEP_ERRORS as exc:
            if step == Step.SWITCH:
                await self.undo_switch(new_ports, serving)
            await self.abandon(new_ports, staging)
            raise DeployFailed(step, self.repository.secrets.redact(_reason(exc))) from None
        except asyncio.CancelledError:
            if step == Step.SWITCH:
                await asyncio.shield(self.undo_switch(new_ports, serving))
            await asyncio.shield(self.abandon(new_ports, staging))
            raise

        log.info("switched port %d to %s on %s", self.config.ports.public, record.commit[:12],
                 new.describe(), extra=fields(message_id=MessageId.DEPLOY_SWITCHED,
                                              deployment_id=record.id, release=record.commit,
                                              port=new.port,
                                              unit=control.unit(new.port, self.config.forwarder)))
        # Past the switch a failure can leave either release carrying the traffic: what
        # serves is then for the controller to read back from systemd.
        try:
            if serving is None or serving.ports == new.ports:
                step = Step.WORKERS
                record = await self.swap_workers(record, processes, env)
                return replace(record, state=State.SUCCEEDED), new

            step = Step.DRAIN
            for port in serving.ports:  # keep-alive clients leave at their next request
                drainflag.put(self.run_dir, port)
            record = await self.drain(record, serving.ports)
            if self.config.post_switch_watch > 0:
                step = Step.WATCH
                record = await self.report(record, step, new.port)
                self.watching = True
                try:
                    trouble = await self.watch(new.ports, serving.ports)
                finally:
                    self.watching = False
                if trouble:
                    step = Step.SWITCH_BACK
                    record = await self.report(record, step, serving.port)
                    # Before it acts: a controller that dies during it then finishes it.
                    switchback.record(self.run_dir, self.config.app_name, record.id)
                    await self.switch_back(serving.ports, new.ports)
                    switchback.clear(self.run_dir, self.config.app_name)
                    why = (self.switch_back_reason if self.switch_back_asked.is_set()
                           else f"unhealthy after the switch ({trouble})")
                    raise DeployFailed(Step.WATCH, f"{why}; traffic went back to "
                                       f"{serving.release[:12]} on {serving.describe()}",
                                       State.SWITCHED_BACK)
            step = Step.WORKERS
            record = await self.swap_workers(record, processes, env)
            step = Step.STOP_OLD
            record = await self.stop_old(record, serving.ports)
        except _STEP_ERRORS as exc:
            raise Unsettled(step, self.repository.secrets.redact(_reason(exc))) from None
        return replace(record, state=State.SUCCEEDED), new

    async def wait_healthy(self, port: int) -> None:
        await health.wait_healthy(port, health.Check.of(self.config),
                                  lambda: instances.failure(self.systemd, port))

    async def start_instance(self, record: Deployment, env: dict[str, str], wsgi: str,
                             started: list[int]) -> Deployment:
        """Start bluegreen-app@PORT on a free port (not one of the ``started`` instances of
        this deploy); the record returned carries the port.

        Should another program bind the port between our look and the instance's socket unit's
        bind, the instance fails to start: it is stopped and another port is tried.
        """
        avoid: set[int] = set(started)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            in_use = await ports.of_units(self.systemd, (instances.PATTERN, instances.SOCKET_PATTERN,
                                                         *control.PATTERNS))
            # Another app's deploy may have picked a port whose unit is not loaded yet: its
            # settings file, written in the same step as the pick, says so.
            in_use.extend(instances.ports_with_env(self.run_dir))
            port = ports.pick(self.config.ports.range, avoid.union(in_use))
            instances.write_env(self.run_dir, self.instance_spec(port, env, wsgi))
            record = replace(record, port=port)
            if not started:  # the step is reported once, with the first instance's port
                record = await self.report(record, Step.START, port)
            try:
                await appenv.give_secrets(self.systemd, instances.unit(port), self.config.app_name)
                await self.systemd.set_properties(instances.unit(port),
                                                  transient.network_properties(self.config.app.network))
                await instances.start(self.systemd, port)
                return record
            except (SystemdError, OSError):
                await self.abandon([port], None)
                taken = bool(sockdiag.listeners(port))  # by someone else: ours is closed now
                if attempt == PORT_ATTEMPTS or not taken:
                    raise
            log.warning("port %d was taken by another program; trying another port", port,
                        extra=fields(deployment_id=record.id, port=port))
            avoid.add(port)
        raise AssertionError("unreachable")

    async def drain(self, record: Deployment, old_ports: tuple[int, ...]) -> Deployment:
        """Stop the old forwarders once their requests are done; wait for the old instances'."""
        record = await self.report(record, Step.DRAIN, old_ports[0])
        deadline = time.monotonic() + self.config.drain_timeout
        for old_port in old_ports:
            try:
                await self.forwarders.drain(old_port)
            except (SystemdError, ForwarderError) as exc:
                log.error("could not stop the old forwarder to port %d: %s", old_port, exc,
                          extra=fields(deployment_id=record.id, port=old_port))
        for old_port in old_ports:
            left = await wait_until_idle(old_port, deadline)
            if left:
                log.warning("%d connections to the old instance on port %d still open after "
                            "drain_timeout (%g s)", left, old_port, self.config.drain_timeout,
                            extra=fields(deployment_id=record.id, port=old_port))
        return record

    async def watch(self, new_ports: tuple[int, ...], old_ports: tuple[int, ...]) -> str | None:
        """Check the new release for post_switch_watch seconds; return why it is unhealthy.

        Every new instance is watched: one that fails here fails the release."""
        check = health.Check.of(self.config)
        deadline = time.monotonic() + self.config.post_switch_watch
        failures = {port: health.Failures() for port in new_ports}
        while time.monotonic() < deadline:
            if self.switch_back_asked.is_set():
                return self.switch_back_reason
            if all([await instances.failure(self.systemd, port) for port in old_ports]):
                return None  # nothing to go back to: keep the new release
            for new_port in new_ports:
                failure = await instances.failure(self.systemd, new_port)
                if failure:
                    return failure
                unhealthy = failures[new_port].count(await health.probe(new_port, check),
                                                      check.unhealthy_threshold)
                if unhealthy:
                    return unhealthy
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.switch_back_asked.wait(), check.interval)
        return self.switch_back_reason if self.switch_back_asked.is_set() else None

    def ask_switch_back(self, reason: str) -> bool:
        """An operator's rollback during the watch: end it now and switch back to the old
        instance, still warm. False when no watch is under way."""
        if not self.watching:
            return False
        self.switch_back_reason = reason
        self.switch_back_asked.set()
        return True

    async def switch_back(self, old_ports: tuple[int, ...], new_ports: tuple[int, ...]) -> None:
        """Point the public port at the old instances again and retire the new ones."""
        for old_port in old_ports:
            drainflag.clear(self.run_dir, old_port)
            await self.forwarders.switch_to([old_port])
        try:
            for new_port in new_ports:  # before any drain: it steers away from them all
                drainflag.put(self.run_dir, new_port)
            for new_port in new_ports:
                await self.forwarders.drain(new_port)
        finally:
            await self.abandon(list(new_ports), None)

    async def swap_workers(self, record: Deployment, processes: Processes,
                           env: dict[str, str]) -> Deployment:
        """Start the serving release's workers, then stop the old release's (gracefully).

        A worker that does not start is logged and noted in the record; the web release,
        healthy, stays.
        """
        assert record.port
        app = self.config.app_name
        if not processes.workers and not await workers.listing(self.systemd, self.run_dir, app):
            return record
        record = await self.report(record, Step.WORKERS, record.port)
        problems = await workers.start(self.systemd, self.run_dir, record.port, processes.workers,
                                       env, self.config.app.network, app)
        await workers.stop(self.systemd, self.run_dir, keep=record.port, app=app)
        if problems:
            text = "; ".join(f"worker {name}: {why}" for name, why in problems.items())
            record = replace(record, reason=self.repository.secrets.redact(text))
        return record

    async def stop_old(self, record: Deployment, old_ports: tuple[int, ...]) -> Deployment:
        record = await self.report(record, Step.STOP_OLD, old_ports[0])
        for old_port in old_ports:
            try:
                await instances.stop(self.systemd, old_port)
                instances.remove_env(self.run_dir, old_port)
            except SystemdError as exc:
                log.error("could not stop the old instance on port %d: %s", old_port, exc,
                          extra=fields(deployment_id=record.id, port=old_port))
                record = replace(record,
                                 reason=f"old instance on port {old_port} not stopped: {exc}")
        return record

    async def undo_switch(self, new_ports: list[int], serving: Serving | None) -> None:
        """After a failed switch, what forwards is what serves: the old release alone."""
        try:
            await self.forwarders.switch_back(new_ports, serving.ports if serving else ())
        except (SystemdError, ForwarderError) as exc:
            log.error("the forwarders of the failed switch are not all undone: %s", exc)

    async def abandon(self, ports: list[int], staging: Path | None) -> None:
        """Stop instances that are not to serve, and drop an unfinished release."""
        if staging is not None:
            self.releases.discard(staging)
        for port in ports:
            try:
                await instances.stop(self.systemd, port)
            except SystemdError as exc:
                log.error("could not stop the new instance on port %d: %s", port, exc)
            instances.remove_env(self.run_dir, port)

    def verifier(self, record: Deployment) -> Verifier:
        return Verifier(self.systemd, self.config, self.environments, record.id)

    def app_environment(self, record: Deployment, release_dir: Path,
                        environment_dir: Path | None) -> dict[str, str]:
        return appenv.environment(self.config, record.commit, release_dir, environment_dir, record.id)

    def wsgi(self, record: Deployment, processes: Processes) -> str:
        """The WSGI app to serve: app.wsgi, else the one the Procfile's web line names, else
        app:app."""
        if self.config.app.wsgi:
            return self.config.app.wsgi
        if processes.web:
            log.info("serving %s, the app the Procfile's web line names", processes.web,
                     extra=fields(deployment_id=record.id))
            return processes.web
        return DEFAULT_WSGI

    def instance_spec(self, port: int, env: dict[str, str], wsgi: str) -> InstanceSpec:
        app = self.config.app
        return InstanceSpec(port=port, wsgi=wsgi, workers=app.workers,
                            worker_class=app.worker_class, app_environment=env,
                            drain_file=drainflag.path(self.run_dir, port),
                            forwarded_allow_ips=control.trusted_proxies(self.config))


def no_release_phase(trigger: Trigger, *, ran_before: bool, served_before: bool) -> str | None:
    """Why a deployment runs no release phase, or None when it moves its release forward and
    runs it. An older release cannot "upgrade" to a schema it has never heard of, and one that
    served here before finds its schema (or a newer one) in place: so never for a rollback or a
    recovery, nor for a start-up deploy of a release that served before, nor twice for a
    release whose release phase ran to its end on this host."""
    if trigger == Trigger.ROLLBACK:
        return "a rollback runs none"
    if trigger == Trigger.RECOVERY:
        return "a recovery redeploys the serving release"
    if ran_before:
        return "it ran to its end on this host before"
    if trigger == Trigger.STARTUP and served_before:
        return "the start-up deploy serves again a release that served before"
    return None


async def wait_until_idle(port: int, deadline: float, poll: float = 0.05) -> int:
    """Wait until nothing is connected to the server on ``port``; return what is left."""
    while True:
        left = sockdiag.served_connections(port)
        if left == 0 or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(poll)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)
