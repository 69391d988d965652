"""The controller of one app: owns what serves, the deployment in progress and its observers.

Every entry point (D-Bus, and through it HTTP and the CLI; the refresher; recovery) asks this
object; it alone starts deployments, so at most one runs. At start-up it adopts what systemd
runs (reconcile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from bluegreen import answers, instances, pool, reconcile, refresher
from bluegreen import canary as canary_module
from bluegreen import log as logsetup
from bluegreen import recorder as recorder_module
from bluegreen.config import Config
from bluegreen.deploy import DeployFailed, Unsettled, no_release_phase
from bluegreen.forwarders import control
from bluegreen.history import Deployment, HistoryError, State, Step, Trigger
from bluegreen.log import fields
from bluegreen.metrics import Metrics
from bluegreen.parts import Parts, Paths
from bluegreen.recorder import Recorder
from bluegreen.recovery import Recovery
from bluegreen.refusals import Busy, NoCanary, NotConfigured
from bluegreen.release.repository import RepositoryError, validate_ref
from bluegreen.serving import Serving
from bluegreen.settings import Settings
from bluegreen.systemd import Systemd
from bluegreen.tasks import Tasks

log = logging.getLogger(__name__)

# A request that comes during the start-up's clean-up waits this long for it to end before it is
# refused as busy (a stale forwarder's drain can take drain_timeout; a D-Bus call gives up
# after 25 s).
SETTLE_WAIT = 10.0


class Observer(Protocol):
    def step(self, deployment: Deployment, step: Step, port: int) -> None: ...
    def finished(self, deployment: Deployment) -> None: ...
    def changed(self) -> None: ...


class Controller:
    def __init__(self, config: Config, systemd: Systemd, paths: Paths, parts: Parts,
                 notify_status: Callable[[str], None] = lambda text: None,
                 fatal: asyncio.Event | None = None) -> None:
        self.systemd = systemd
        self.paths = paths
        self.app = config.app_name
        self.secrets = parts.secrets
        self.history = parts.history
        self.repository = parts.repository
        self.catalog = parts.catalog
        self.releases = parts.releases
        self.deployer = parts.deployer
        self.settings = Settings(config, self.history)
        self.observers: list[Observer] = []
        self.notify_status = notify_status
        self.serving: Serving | None = None
        # The deployment in progress: its record, and the settings it deploys with.
        self.recorder: Recorder | None = None
        self._preparing: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.tasks = Tasks(self.app, fatal or asyncio.Event())
        self.forwarders = parts.forwarders
        self.pool = pool.Pool(systemd, self.forwarders, lambda: self.settings.in_effect,
                              lambda: self.busy)
        self.recovery = Recovery(self, self.pool, self.tasks, self.settings.in_effect,
                                 self._changed)
        self.monitor = self.recovery.monitor
        systemd.on_unit_state.append(self.recovery.on_unit_state)
        self.refresher = refresher.Refresher(
            self.repository, config.repository.poll_interval,
            lambda head: self.request_deploy(head, Trigger.REFRESHER), self.history,
            lambda: self.serving.release if self.serving else "")
        # Set once what serves is adopted (the daemon sends READY=1 then).
        self._started = False
        # Set while the start-up's reconciliation stops what must not run: no deployment yet.
        self._settling = False
        self.metrics = Metrics()
        last = self.history.last_succeeded()
        self.metrics.last_success = (last.finished_at or 0.0) if last else 0.0

    # --- what entry points ask -------------------------------------------------------------

    @property
    def fatal(self) -> asyncio.Event:
        """Set when a background task ended unexpectedly: the daemon exits."""
        return self.tasks.fatal

    @property
    def current(self) -> Deployment | None:
        return self.recorder.record if self.recorder is not None else None

    @property
    def deployment_task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def state(self) -> str:
        if self._settling:
            return "starting"  # what serves is known; leftovers are still being stopped
        if self.current is not None or self._preparing is not None:
            return "deploying"
        if self.serving is None:
            return "idle"
        return "serving" if self.monitor.healthy else "unhealthy"

    @property
    def busy(self) -> bool:
        """A deployment, or the start-up's reconciliation, owns the units now."""
        return self.current is not None or self._preparing is not None or self._settling

    def health(self) -> tuple[bool, str]:
        """Overall health: serving a release that passes its checks."""
        if self.serving is None:
            return False, "no release is serving"
        if not self.monitor.healthy:
            return False, f"the serving release is unhealthy: {self.monitor.reason}"
        out = self.pool.out()
        return True, (f"release {self.serving.release[:12]} serves on {self.serving.describe()}"
                      + (f" (out until healthy again: port {', '.join(map(str, out))})"
                         if out else ""))

    def last_deployment(self) -> Deployment | None:
        recent = self.history.recent(1)
        return recent[0] if recent else None

    def render_metrics(self) -> str:
        self.metrics.health_check_failures = self.monitor.failures_total
        serving = self.serving
        return self.metrics.render(serving.release if serving else "", serving.port if serving else 0,
                                   self.health()[0], self.answered())

    def answered(self) -> list[tuple[str, int, answers.Answers]]:
        """What each of the app's running instances answered, with its release."""
        result = []
        for port in sorted(instances.ports_with_env(self.paths.runtime)):
            settings = instances.read_env(self.paths.runtime, port)
            if instances.app_named(settings) == self.app:
                result.append((settings.get("BLUEGREEN_RELEASE", ""), port, answers.read(port)))
        return result

    async def pending_settings(self) -> list[tuple[str, str]]:
        """Settings of the file not in effect yet, each with what applies it."""
        return await self.settings.pending(self.systemd, self.serving is not None)

    # --- deploying -------------------------------------------------------------------------

    async def request_deploy(self, ref: str, trigger: Trigger, wait: bool = False,
                             canary: float | None = None) -> Deployment:
        """Resolve ``ref`` and start deploying it; return the new record at once. ``canary``:
        the share of new connections the new release takes first (None: canary.share).

        Raises InvalidRef/UnknownRef/RepositoryError (nothing recorded, nothing changed),
        Busy while another deployment runs (unless ``wait``: then it waits for that one to
        end first), NotConfigured without a repository.
        """
        logsetup.APP.set(self.app)
        validate_ref(ref)
        await self._claim_when_idle(ref or self.settings.in_effect.repository.branch, wait)
        try:
            started = time.time()
            commit = self.catalog.on_disk(ref) or await self.repository.resolve(ref)
            # With the file's settings as they are now: a reload during the deploy waits.
            recorder = self.recorder = recorder_module.begin(
                self.history, ref or self.settings.in_effect.repository.branch, trigger, commit,
                self.serving, started, self.settings.in_file, self._on_step)
            recorder.canary_share = canary
            self._changed()
        finally:
            self._preparing = None
        self._task = self.tasks.spawn(self._run(recorder), f"deploy-{recorder.record.id}",
                                      forever=False)
        return recorder.record

    async def request_rollback(self, target: str, who: str = "", wait: bool = False) -> Deployment:
        """Deploy an earlier release: the previous good one, a deployment id or a commit.

        Only releases still on disk qualify: a rollback needs no fetch and no build. Asked
        while a deployment watches its new release (the old instance still warm) for that old
        release, it ends that deployment at once with a switch-back and returns its record.
        """
        logsetup.APP.set(self.app)
        current = self.current
        if current is not None and _is_switch_back(current, target):
            done = "aborted" if current.steps[-1].step == Step.CANARY else "switched back"
            reason = f"{done} by the operator" + (f" ({who})" if who else "")
            if self.deployer.ask_switch_back(reason):
                log.warning("deployment %d: %s", current.id, reason,
                            extra=fields(deployment_id=current.id, release=current.commit))
                return current
        if wait:
            await self._wait_until_idle()
        elif self.current is not None or self._preparing is not None:
            self._claim(target)  # raises Busy, naming the running deployment
        sha = self.catalog.rollback_commit(target, self.serving.release if self.serving else "")
        return await self.request_deploy(sha, Trigger.ROLLBACK, wait)

    def request_promote(self, who: str = "") -> Deployment:
        """End the canary under way early with a promotion; return its deployment's record.

        Raises NoCanary when none runs."""
        current = self.current
        reason = "promoted by the operator" + (f" ({who})" if who else "")
        if current is None or not self.deployer.analysis.promote(reason):
            raise NoCanary("no canary is under way: nothing to promote")
        log.warning("deployment %d: canary %s", current.id, reason,
                    extra=fields(deployment_id=current.id, release=current.commit))
        return current

    def canary(self) -> canary_module.Reading | None:
        """Where the canary under way stands (None: none runs)."""
        return self.deployer.analysis.reading

    async def _claim_when_idle(self, what: str, wait: bool) -> None:
        # Right after a (re)start, the clean-up of what was left over is usually done in a few
        # milliseconds: `systemctl restart bluegreen && bluegreenctl deploy` must not be refused.
        deadline = time.monotonic() + SETTLE_WAIT
        while self._settling and not wait and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        while True:
            if wait:
                await self._wait_until_idle()
            try:
                self._claim(what)
                return
            except Busy:
                if not wait:
                    raise

    async def _wait_until_idle(self) -> None:
        """Until no deployment runs or is being prepared (another waiter may win the race:
        the claim that follows raises Busy then)."""
        while self.busy:
            task = self._task
            if task is not None:
                await asyncio.wait([task])
            else:
                await asyncio.sleep(0.05)

    def _claim(self, what: str) -> None:
        if self._settling:
            raise Busy("the controller is still stopping what it found left over at start-up")
        if self.current is not None:
            raise Busy(f"deployment {self.current.id} ({self.current.commit[:12]}) is running")
        if self._preparing is not None:
            raise Busy(f"a deployment of {self._preparing!r} is being prepared")
        config = self.settings.in_effect
        if not config.repository.url:
            raise NotConfigured("no repository configured: set repository.url in "
                                f"{config.source} or TEAM_REPO_URL")
        self._preparing = what
        self._changed()

    async def _run(self, recorder: Recorder) -> None:
        record = recorder.record
        unsettled = False
        try:
            skip = no_release_phase(Trigger(record.trigger),
                                    ran_before=self.history.release_phase_ran(record.commit),
                                    served_before=self.history.served(record.commit))
            self.serving = await self.deployer.deploy(self.serving, recorder.config, recorder, skip)
            self.pool.reset(self.serving)
            self._deployed_with(recorder.config)
            self.monitor.reset()
            state, failed_step, reason = State.SUCCEEDED, "", recorder.record.reason
        except DeployFailed as exc:
            unsettled = isinstance(exc, Unsettled)
            state, failed_step, reason = exc.state, str(exc.step), exc.reason
            recorder.failed(exc)
        except asyncio.CancelledError:
            self._finish(recorder.finish(State.INTERRUPTED, reason="the controller was stopped"))
            raise
        except Exception as exc:  # a bug: record it, keep the daemon alive
            log.exception("deployment %d crashed", record.id)
            unsettled = True
            state, failed_step, reason = State.FAILED, "", f"internal error: {exc!r}"
        if unsettled:
            reason = f"{reason}; {await self._read_back_serving()}"
        record = recorder.finish(state, failed_step=failed_step, reason=reason,
                                 serving=self.serving)
        self._finish(record)
        config = self.settings.in_effect
        self.catalog.tidy(record.state == State.SUCCEEDED,
                          self.serving.release if self.serving else "", config.release.keep,
                          config.history_limit)

    async def _read_back_serving(self) -> str:
        """After a failure that may have moved the traffic, find out from systemd which release
        serves, keep only it, and say which."""
        try:
            self.serving, out = await reconcile.read_back(self.systemd, self.paths.runtime,
                                                          self.forwarders, self.settings.in_effect)
            self.pool.reset(self.serving, out=out)
        except Exception:
            log.exception("cannot tell which release serves")
            self.fatal.set()  # a restarted controller reconciles
            return "which release serves is unknown until the controller restarts"
        finally:
            self.monitor.reset()
        if self.serving is None:
            return "no release serves"
        return f"{self.serving.release[:12]} serves on {self.serving.describe()}"

    def _finish(self, record: Deployment) -> None:
        self.metrics.deployment_finished(record)
        config = self.settings.in_effect
        if record.state != State.SUCCEEDED:  # the deploy's forwarder settings did not take
            self.forwarders.write_env(config)
        # The refresher leaves a pushed head alone once its deployment has an outcome; an
        # interrupted one is tried again.
        if record.state != State.INTERRUPTED and (
                record.trigger == Trigger.REFRESHER or record.ref == config.repository.branch):
            self.refresher.see(record.commit)
        self.recorder = None
        self._task = None
        for observer in self.observers:
            observer.finished(record)
        self._changed()

    # --- observers -------------------------------------------------------------------------

    def _on_step(self, record: Deployment, step: Step, port: int) -> None:
        self.notify_status(f"Deploying {record.commit[:12]} (deployment {record.id}): {step}")
        for observer in self.observers:
            observer.step(record, step, port)

    def _changed(self) -> None:
        if self.current is None and self._preparing is None:
            if self.serving is not None:
                self.notify_status(f"Serving {self.serving.release[:12]} on "
                                   f"{self.serving.describe()} via port "
                                   f"{self.settings.in_effect.ports.public}")
            else:
                self.notify_status("Idle: no release serves")
        for observer in self.observers:
            observer.changed()

    # --- the refresher and the push webhook ------------------------------------------------

    def refresh(self) -> None:
        """Look at the remote now instead of at the next poll."""
        self.refresher.wake()

    def push_notification(self, payload: bytes, signature: str) -> None:
        """A push webhook: check its signature, then refresh."""
        refresher.check_signature(self.secrets.webhook_secret, payload, signature)
        self.refresh()

    # --- the configuration -----------------------------------------------------------------

    def reload(self, in_file: Config) -> list[tuple[str, str]]:
        """Apply the app's settings as read again (appmanager.py reads every app's file);
        return each changed key with when it takes effect (at once, at the next deploy, or
        after what the admin must run)."""
        before = self.settings.in_effect
        changes = self.settings.reload(in_file, self.serving is not None)
        self._apply(before)
        self._changed()
        return changes

    def _deployed_with(self, config: Config) -> None:
        before = self.settings.in_effect
        self.settings.deployed(config)
        self._apply(before)

    def _apply(self, before: Config) -> None:
        """Make the settings in effect (no longer ``before``) those of every part that holds
        some."""
        config = self.settings.in_effect
        self.recovery.apply(config)
        self.repository.url, self.repository.branch = config.repository.url, config.repository.branch
        interval = self.refresher.interval
        self.refresher.interval = config.repository.poll_interval
        if before.drain_timeout != config.drain_timeout or before.ports != config.ports:
            self.forwarders.write_env(config)
        if before.repository.ssh_known_hosts != config.repository.ssh_known_hosts:
            self.repository.trust(config.repository.ssh_known_hosts)
        if self._started and not self._settling:  # else the start-up's end watches the remote
            self._watch_remote()
            if self.refresher.running and interval != config.repository.poll_interval:
                self.refresher.wake()  # poll now, then at the new interval

    def _watch_remote(self) -> None:
        repository = self.settings.in_effect.repository
        self.refresher.watch(bool(repository.url and repository.watch), self.tasks)

    # --- start-up and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what systemd runs; the rest of the start-up (stopping what must not run, a
        deployment if nothing serves, the refresher) goes on in the background, so that the
        controller is ready at once."""
        config = self.settings.in_effect
        self.forwarders.write_env(config)
        self.repository.trust(config.repository.ssh_known_hosts)
        try:
            if control.ensure_migrate_req():
                log.info("set net.ipv4.tcp_migrate_req=1 (switches keep queued connections)")
        except control.ForwarderError as exc:
            log.error("%s; deployments will fail at the switch", exc)
        reconcile.mark_interrupted(self.history)
        self.refresher.forget_interrupted()
        self.serving = await reconcile.adopt(self.systemd, self.paths.runtime, self.app)
        self.pool.reset(self.serving)
        self._settling = True
        self.tasks.spawn(self.monitor.run(), "health-monitor")
        self.tasks.spawn(self._settle(), "start-up", forever=False)
        self._started = True  # the daemon sends READY=1 next
        self._changed()

    async def _settle(self) -> None:
        config = self.settings.in_effect
        try:
            out = await reconcile.clean_up(self.systemd, self.paths.runtime, self.serving,
                                           self.forwarders, config, self.releases)
            self.pool.reset(self.serving, out=out)
        finally:
            self._settling = False
            self._changed()
        if self.serving is None and config.repository.url:
            await self._startup_deploy()
        self._watch_remote()

    async def _startup_deploy(self) -> None:
        last = self.history.last_succeeded()
        ref = last.commit if last and self.releases.exists(last.commit) else ""
        try:
            await self.request_deploy(ref, Trigger.STARTUP)
        except (RepositoryError, Busy, NotConfigured, HistoryError) as exc:
            log.error("nothing serves and no deployment could start: %s", exc)

    async def remove(self) -> None:
        """The app is gone from the configuration: stop the controller's work, then every unit
        of the app (its data, releases and records stay)."""
        await self.stop()
        log.warning("the app's file is gone: stopping its forwarders, instances and workers")
        await reconcile.settle(self.systemd, self.paths.runtime, None, self.forwarders,
                               self.settings.in_effect)

    async def stop(self) -> None:
        # An app removed by a reload stops for good: its units are no longer its to watch
        # (another app may start instances on their ports).
        with contextlib.suppress(ValueError):
            self.systemd.on_unit_state.remove(self.recovery.on_unit_state)
        self.pool.reset(None)
        self.tasks.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.history.close()


def _is_switch_back(current: Deployment, target: str) -> bool:
    """Whether a rollback to ``target`` asks for the release ``current`` is watched (or its
    canary runs) against."""
    if not current.previous_release or not current.steps or \
            current.steps[-1].step not in (Step.CANARY, Step.WATCH):
        return False
    return target == "" or (len(target) >= 7 and current.previous_release.startswith(target))
