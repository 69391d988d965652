"""The deploy flow: one commit from the repository to serving on the public port.

    materialize the release -> verify it (its Python environment, build, import, check) ->
    migrate: the release phase -> start bluegreen-app@PORT on a free port (app.instances of
    them) -> health-check each -> canary (if asked): the new release takes a share of new
    connections until its answers promote or abort it (canary.py) -> switch: start the
    forwarder to each PORT -> drain: stop the old forwarders, wait for the old instances'
    connections to end -> watch the new release (the old instances still run) -> workers:
    start the new release's, stop the old one's -> stop the old instances

Until the switch, a failure stops the new instances and the old release never stops serving;
an aborted canary's requests in flight finish first.
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
from dataclasses import dataclass, field
from pathlib import Path

from bluegreen import canary, drainflag, health, instances, ports, sockdiag, switchback, workers
from bluegreen.config import Config, Forwarder, share_text
from bluegreen.forwarders import control, direct
from bluegreen.forwarders.control import ForwarderError
from bluegreen.history import State, Step, Trigger
from bluegreen.instances import InstanceSpec
from bluegreen.log import MessageId, fields
from bluegreen.recorder import Recorder
from bluegreen.release import appenv, transient
from bluegreen.release.prepare import Prepared, Preparer
from bluegreen.release.procfile import ProcfileError
from bluegreen.release.repository import RepositoryError
from bluegreen.release.verify import VerifyFailed
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


# Given an app and a public port: the other app whose forwarders serve that port, if any.
PortUser = Callable[[str, int], Awaitable[str | None]]


async def no_port_user(app: str, port: int) -> str | None:
    return None


PORT_ATTEMPTS = 3

_STEP_ERRORS = (SystemdError, health.NotHealthy, ports.NoFreePort, RepositoryError, CommandError,
                ForwarderError, VerifyFailed, transient.CommandFailed, ProcfileError, OSError)


@dataclass
class Deployer:
    systemd: Systemd
    preparer: Preparer
    forwarders: control.Forwarders
    run_dir: Path
    redact: Callable[[str], str]  # the secrets out of a failure's reason
    port_user: PortUser = no_port_user
    # Set by an operator's rollback while the new release is watched: switch back at once.
    switch_back_asked: asyncio.Event = field(default_factory=asyncio.Event)
    switch_back_reason: str = ""
    watching: bool = False
    # The canary under way, if any: where it stands, and an operator's promotion.
    analysis: canary.Analysis = field(default_factory=canary.Analysis)

    async def deploy(self, serving: Serving | None, config: Config, recorder: Recorder,
                     skip_release_phase: str | None = None) -> Serving:
        """Deploy the recorded deployment's commit (already resolved) with ``config``; return
        what serves now. ``skip_release_phase``: why the release, not moving forward, runs no
        release phase (see no_release_phase); None when it runs it.

        Raises DeployFailed, with the old release serving, if a step fails before the switch
        or the new release fails its watch after it; Unsettled if a step fails past the switch
        in a way that leaves unknown which release serves.
        """
        self.switch_back_asked.clear()
        started: list[int] = []
        try:
            release = await self.preparer.prepare(config, recorder)
            await self.release_phase(release, config, recorder, skip_release_phase)
            async with recorder.step(Step.START, port=None):  # told once the first port is picked
                new = await self.start_instances(release, config, recorder, started)
            async with recorder.step(Step.HEALTH, new.port):
                passed = await asyncio.gather(*(self.wait_healthy(port, config)
                                                for port in new.ports))
                self.tell_health_path(passed[0], config, recorder)
            share = self.canary_share(serving, config, recorder)
            if serving is not None and share:
                async with recorder.step(Step.CANARY, new.port):
                    await self.canary(new, serving, share, config, recorder)
            async with recorder.step(Step.SWITCH, new.port):
                await self.switch(new, config, after_canary=bool(share))
        except _STEP_ERRORS as exc:
            await self.abandon(started, serving, config, recorder.current)
            raise DeployFailed(recorder.current, self.redact(_reason(exc))) from None
        except asyncio.CancelledError:
            await asyncio.shield(self.abandon(started, serving, config, recorder.current))
            raise

        log.info("switched port %d to %s on %s", config.ports.public, release.commit[:12],
                 new.describe(), extra=fields(message_id=MessageId.DEPLOY_SWITCHED,
                                              deployment_id=recorder.record.id,
                                              release=release.commit, port=new.port,
                                              unit=control.unit(new.port, config.forwarder)))
        # Past the switch a failure can leave either release carrying the traffic: what
        # serves is then for the controller to read back from systemd.
        old = serving if serving is not None and serving.ports != new.ports else None
        try:
            if old is not None:
                async with recorder.step(Step.DRAIN, old.port):
                    await self.drain(old.ports, config, recorder.record.id)
                if config.post_switch_watch > 0:
                    async with recorder.step(Step.WATCH, new.port):
                        trouble = await self.watch(new.ports, old.ports, config)
                    if trouble:
                        async with recorder.step(Step.SWITCH_BACK, old.port):
                            await self.switch_back(old.ports, new.ports, config, recorder.record.id)
                        why = (self.switch_back_reason if self.switch_back_asked.is_set()
                               else f"unhealthy after the switch ({trouble})")
                        raise DeployFailed(Step.WATCH, f"{why}; traffic went back to "
                                           f"{old.release[:12]} on {old.describe()}",
                                           State.SWITCHED_BACK)
            if release.processes.workers or await workers.listing(self.systemd, self.run_dir,
                                                                  config.app_name):
                async with recorder.step(Step.WORKERS, new.port):
                    await self.swap_workers(new.port, release, config, recorder)
            if old is not None:
                async with recorder.step(Step.STOP_OLD, old.port):
                    await self.stop_old(old.ports, recorder)
        except _STEP_ERRORS as exc:
            raise Unsettled(recorder.current, self.redact(_reason(exc))) from None
        return new

    async def release_phase(self, release: Prepared, config: Config, recorder: Recorder,
                            skip: str | None) -> None:
        """Run the Procfile's release line (migrations, say), unless ``skip`` says why not."""
        if not release.processes.release:
            return
        if skip is not None:
            log.info("release phase of %s not run: %s", release.commit[:12], skip,
                     extra=fields(deployment_id=recorder.record.id, release=release.commit))
            return
        async with recorder.step(Step.MIGRATE):
            try:
                await transient.run(self.systemd, appenv.command(
                    config, "the release phase", "migrate",
                    ["/bin/sh", "-c", release.processes.release], release.directory,
                    release.environment), recorder.record.id)
            except transient.CommandFailed as exc:
                raise transient.CommandFailed(
                    f"{exc.reason}. If this release is older than the app's data (its "
                    f"migrations behind the database's), `bluegreenctl rollback "
                    f"{release.commit[:12]}` serves it without its release phase") from None

    async def start_instances(self, release: Prepared, config: Config, recorder: Recorder,
                              started: list[int]) -> Serving:
        """Start app.instances instances of the release; ``started`` collects their ports."""
        appenv.prepare_data_dir(config.app_name)
        for _ in range(config.app.instances):
            started.append(await self.start_instance(release, config, recorder, started))
        new = Serving.of(started, release.commit)
        recorder.update(port=new.port)
        return new

    async def wait_healthy(self, port: int, config: Config) -> health.Probe:
        return await health.wait_healthy(port, health.Check.of(config),
                                         lambda: instances.boot_failure(self.systemd, port))

    def tell_health_path(self, passed: health.Probe, config: Config, recorder: Recorder) -> None:
        """Say once, in the journal and the record, that the app is checked on another path
        than app.health_path's default."""
        note = health.fallback_note(health.Check.of(config), passed)
        if note:
            log.info("%s", note, extra=fields(deployment_id=recorder.record.id,
                                              release=recorder.record.commit))
            recorder.note(note)

    async def start_instance(self, release: Prepared, config: Config, recorder: Recorder,
                             started: list[int]) -> int:
        """Start bluegreen-app@PORT on a free port (not one of the ``started`` instances of
        this deploy); return the port.

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
            port = ports.pick(config.ports.range, avoid.union(in_use))
            instances.write_env(self.run_dir, self.instance_spec(port, release, config))
            recorder.at_port(port)
            try:
                await appenv.give_secrets(self.systemd, instances.unit(port), config.app_name)
                await self.systemd.set_properties(instances.unit(port),
                                                  transient.network_properties(config.app.network))
                await self.forwarders.prepare_instance(port, config)
                await instances.start(self.systemd, port,
                                      public=config.forwarder == Forwarder.DIRECT)
                return port
            except ForwarderError:  # the public port cannot be shared: no other port helps
                await self.stop_instances([port])
                raise
            except (SystemdError, OSError):
                await self.stop_instances([port])
                taken = bool(sockdiag.listeners(port))  # by someone else: ours is closed now
                if attempt == PORT_ATTEMPTS or not taken:
                    raise
            log.warning("port %d was taken by another program; trying another port", port,
                        extra=fields(deployment_id=recorder.record.id, port=port))
            avoid.add(port)
        raise AssertionError("unreachable")

    def canary_share(self, serving: Serving | None, config: Config, recorder: Recorder) -> float:
        """The share of new connections the new release takes first: the deployment's own, else
        canary.share; none for a deploy that replaces nothing, nor for a rollback, a recovery
        or the start-up's (they put back a release that served)."""
        asked = recorder.canary_share
        share = config.canary.share if asked is None else asked
        if not share:
            return 0.0
        why_not = ("nothing serves to compare it with" if serving is None else
                   "a rollback, a recovery or a start-up deploy runs none"
                   if recorder.record.trigger in (Trigger.ROLLBACK, Trigger.RECOVERY,
                                                  Trigger.STARTUP) else "")
        why_not = why_not or self.forwarders.canary_blocker(config) or ""
        if why_not:
            if asked or serving is not None:
                log.info("deployment %d runs no canary: %s", recorder.record.id, why_not,
                         extra=fields(deployment_id=recorder.record.id))
                recorder.note(f"no canary: {why_not}")
            return 0.0
        recorder.canary_share = share
        return share

    async def canary(self, new: Serving, old: Serving, share: float, config: Config,
                     recorder: Recorder) -> None:
        """Give the new release ``share`` of new connections until its answers (or the
        operator) promote it, then return; abort it otherwise: new connections go back to the
        old release, the canary's requests in flight finish, it stops, and DeployFailed says
        why with both releases' error rates."""
        await self.check_switch(new, config)
        # A controller that dies during the canary keeps the old release (reconcile.py).
        switchback.record(self.run_dir, config.app_name, recorder.record.id)
        before = canary.answered(new.ports), canary.answered(old.ports)
        began = time.monotonic()  # new connections reach it once its forwarders listen
        await self.forwarders.start_canary(new.ports, canary.weights(new.ports, old.ports, share),
                                           config)
        log.info("canary: port %d gives %s of new connections to %s on %s for up to %g s",
                 config.ports.public, share_text(share), new.release[:12], new.describe(),
                 config.canary.duration, extra=fields(deployment_id=recorder.record.id,
                                                      release=new.release, port=new.port))
        check = health.Check.of(config)
        failures = {port: health.Failures() for port in new.ports}
        self.watching = True  # an operator's rollback aborts it
        try:
            decision = await self.analysis.run(
                new.ports, old.ports, before, share, config.canary, check.interval,
                lambda: self.trouble(new.ports, failures, check),
                self.switch_back_asked, lambda: self.switch_back_reason, began,
                lambda: self.all_failed(old.ports))
        finally:
            self.watching = False
        if decision.verdict == canary.Verdict.PROMOTE:
            log.info("deployment %d: %s", recorder.record.id, decision.reason,
                     extra=fields(deployment_id=recorder.record.id, release=new.release))
            recorder.note(decision.reason)
            switchback.clear(self.run_dir, config.app_name)
            return
        log.warning("deployment %d: canary aborted: %s", recorder.record.id, decision.reason,
                    extra=fields(deployment_id=recorder.record.id, release=new.release))
        for port in new.ports:  # keep-alive clients of the canary leave at their next request
            drainflag.put(self.run_dir, port)
        try:
            await self.forwarders.end_canary(old.ports, config)
            for port in new.ports:
                await self.forwarders.drain(port, config)
        finally:
            await self.stop_instances(list(new.ports))
        switchback.clear(self.run_dir, config.app_name)
        raise DeployFailed(Step.CANARY, f"canary aborted: {decision.reason}")

    async def check_switch(self, new: Serving, config: Config) -> None:
        """Refuse to give the public port's traffic to ``new`` if it is not ours to give; write
        the forwarders' settings the switch is to use."""
        for port in new.ports:
            stranger = await instances.foreign_listener(self.systemd, port)
            if stranger:  # never route traffic to a process bluegreen did not start
                raise ForwarderError(stranger)
        app, public = config.app_name, config.ports.public
        user = await self.port_user(app, public)
        if user:  # its listeners would share that app's traffic
            raise ForwarderError(f"port {public} is still served by the app {user}: the app "
                                 f"{app} cannot start its forwarders there")
        control.ensure_migrate_req()
        # The forwarders' settings as this deploy has them (a reload may have changed them).
        address = self.forwarders.write_env(config)
        if not config.ports.public_address and address == "0.0.0.0" and control.ipv6_available():
            log.info("port %d stays on 0.0.0.0, where it is served now; set "
                     "ports.public_address = \"::\" to add IPv6 (the switch that moves it "
                     "resets the connections queued then)", public)

    async def switch(self, new: Serving, config: Config, after_canary: bool = False) -> None:
        """Give every new connection of the public port to the new instances: start their
        forwarders, or, after a canary, which already has them, weigh them alone."""
        if after_canary:
            await self.forwarders.end_canary(new.ports, config)
            return
        await self.check_switch(new, config)
        await self.forwarders.switch_to(new.ports, config)

    async def drain(self, old_ports: tuple[int, ...], config: Config, deployment_id: int) -> None:
        """Stop the old forwarders once their requests are done; wait for the old instances'."""
        for port in old_ports:  # keep-alive clients leave at their next request
            drainflag.put(self.run_dir, port)
        deadline = time.monotonic() + config.drain_timeout
        for old_port in old_ports:
            try:
                await self.forwarders.drain(old_port, config)
            except (SystemdError, ForwarderError) as exc:
                log.error("could not stop the old forwarder to port %d: %s", old_port, exc,
                          extra=fields(deployment_id=deployment_id, port=old_port))
        for old_port in old_ports:
            left = await wait_until_idle(old_port, deadline)
            if left:
                log.warning("%d connections to the old instance on port %d still open after "
                            "drain_timeout (%g s)", left, old_port, config.drain_timeout,
                            extra=fields(deployment_id=deployment_id, port=old_port))

    async def watch(self, new_ports: tuple[int, ...], old_ports: tuple[int, ...],
                    config: Config) -> str | None:
        """Check the new release for post_switch_watch seconds; return why it is unhealthy.

        Every new instance is watched: one that fails here fails the release."""
        self.watching = True
        try:
            return await self._watch(new_ports, old_ports, config)
        finally:
            self.watching = False

    async def _watch(self, new_ports: tuple[int, ...], old_ports: tuple[int, ...],
                     config: Config) -> str | None:
        check = health.Check.of(config)
        deadline = time.monotonic() + config.post_switch_watch
        failures = {port: health.Failures() for port in new_ports}
        while time.monotonic() < deadline:
            if self.switch_back_asked.is_set():
                return self.switch_back_reason
            if await self.all_failed(old_ports):
                return None  # nothing to go back to: keep the new release
            trouble = await self.trouble(new_ports, failures, check)
            if trouble:
                return trouble
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.switch_back_asked.wait(), check.interval)
        return self.switch_back_reason if self.switch_back_asked.is_set() else None

    async def all_failed(self, ports: tuple[int, ...]) -> str | None:
        """Why every instance of ``ports`` has failed (None: one at least has not)."""
        failures = [await instances.failure(self.systemd, port) for port in ports]
        return "; ".join(f for f in failures if f) if all(failures) else None

    async def trouble(self, new_ports: tuple[int, ...], failures: dict[int, health.Failures],
                      check: health.Check) -> str | None:
        """Why the new instances, serving, fail the release now (None: they do not)."""
        for new_port in new_ports:
            failure = await instances.failure(self.systemd, new_port)
            if failure:
                return failure
            # A death systemd has already made good (Restart=) between two checks: the
            # instance may answer again, but the release died once under traffic.
            restarts = (await self.systemd.status(instances.unit(new_port))).restarts
            if restarts:
                return (f"{instances.unit(new_port)} died and was restarted by systemd "
                        f"({restarts} times) since the deploy started it")
            unhealthy = failures[new_port].count(await health.probe(new_port, check),
                                                 check.unhealthy_threshold)
            if unhealthy:
                return unhealthy
        return None

    def ask_switch_back(self, reason: str) -> bool:
        """An operator's rollback during the watch: end it now and switch back to the old
        instance, still warm. False when no watch is under way."""
        if not self.watching:
            return False
        self.switch_back_reason = reason
        self.switch_back_asked.set()
        return True

    async def switch_back(self, old_ports: tuple[int, ...], new_ports: tuple[int, ...],
                          config: Config, deployment_id: int) -> None:
        """Point the public port at the old instances again and retire the new ones."""
        # Before it acts: a controller that dies during it then finishes it.
        switchback.record(self.run_dir, config.app_name, deployment_id)
        for old_port in old_ports:
            drainflag.clear(self.run_dir, old_port)
            await self.forwarders.switch_to([old_port], config)
        try:
            for new_port in new_ports:  # before any drain: it steers away from them all
                drainflag.put(self.run_dir, new_port)
            for new_port in new_ports:
                await self.forwarders.drain(new_port, config)
        finally:
            await self.stop_instances(list(new_ports))
        switchback.clear(self.run_dir, config.app_name)

    async def swap_workers(self, port: int, release: Prepared, config: Config,
                           recorder: Recorder) -> None:
        """Start the serving release's workers, then stop the old release's (gracefully).

        A worker that does not start is logged and noted in the record; the web release,
        healthy, stays.
        """
        app = config.app_name
        problems = await workers.start(self.systemd, self.run_dir, port, release.processes.workers,
                                       release.environment, config.app.network, app)
        await workers.stop(self.systemd, self.run_dir, keep=port, app=app)
        if problems:
            text = "; ".join(f"worker {name}: {why}" for name, why in problems.items())
            recorder.note(self.redact(text))

    async def stop_old(self, old_ports: tuple[int, ...], recorder: Recorder) -> None:
        for old_port in old_ports:
            try:
                await instances.stop(self.systemd, old_port)
                instances.remove_env(self.run_dir, old_port)
            except SystemdError as exc:
                log.error("could not stop the old instance on port %d: %s", old_port, exc,
                          extra=fields(deployment_id=recorder.record.id, port=old_port))
                recorder.note(f"old instance on port {old_port} not stopped: {exc}")

    async def abandon(self, new_ports: list[int], serving: Serving | None, config: Config,
                      failed: Step) -> None:
        """A deploy that did not get past its switch: what forwards is what serves, the old
        release alone, and the new instances stop."""
        if failed in (Step.CANARY, Step.SWITCH):
            try:
                await self.forwarders.switch_back(new_ports, serving.ports if serving else (),
                                                  config)
            except (SystemdError, ForwarderError) as exc:
                log.error("the forwarders of the failed switch are not all undone: %s", exc)
        await self.stop_instances(new_ports)
        if failed == Step.CANARY:
            switchback.clear(self.run_dir, config.app_name)

    async def stop_instances(self, ports: list[int]) -> None:
        """Stop instances that are not to serve."""
        for port in ports:
            try:
                await instances.stop(self.systemd, port)
            except SystemdError as exc:
                log.error("could not stop the new instance on port %d: %s", port, exc)
            instances.remove_env(self.run_dir, port)

    def instance_spec(self, port: int, release: Prepared, config: Config) -> InstanceSpec:
        app = config.app
        worker_class = instances.ASGI_WORKER_CLASS if release.asgi else app.worker_class
        return InstanceSpec(port=port, wsgi=release.wsgi, workers=app.workers,
                            worker_class=worker_class, app_environment=release.environment,
                            drain_file=drainflag.path(self.run_dir, port),
                            forwarded_allow_ips=control.trusted_proxies(config),
                            web_dir=release.processes.web_dir,
                            worker_connections=direct.worker_connections(config, worker_class))


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
