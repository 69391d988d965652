"""The controller of one app: owns what serves, the deployment in progress and the records.

Every entry point (D-Bus, and through it HTTP and the CLI; the refresher; the health monitor)
asks this object; it alone starts deployments, so at most one runs. At start-up it reconciles
its records with the units that systemd actually runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from bluegreen import config as configuration
from bluegreen import health, instances, pool, reconcile, recorder, refresher, settings, workers
from bluegreen import log as logsetup
from bluegreen.config import Config
from bluegreen.credentials import Secrets
from bluegreen.deploy import (
    Deployer,
    DeployFailed,
    PortUser,
    Unsettled,
    no_port_user,
    no_release_phase,
)
from bluegreen.files import atomic_write
from bluegreen.forwarders import control
from bluegreen.history import (
    Deployment,
    History,
    HistoryError,
    State,
    Step,
    StepTiming,
    Trigger,
)
from bluegreen.log import MessageId, fields
from bluegreen.metrics import Metrics
from bluegreen.recorder import Recorder
from bluegreen.release import procfile, transient
from bluegreen.release.prepare import Preparer
from bluegreen.release.releases import Releases
from bluegreen.release.repository import Commit, Repository, RepositoryError, UnknownRef, validate_ref
from bluegreen.release.venvs import Environments
from bluegreen.serving import Serving
from bluegreen.systemd import Systemd

log = logging.getLogger(__name__)

SEEN_HEAD = "refresher.seen_head"

# Recovery tries again while the serving release stays unhealthy, waiting longer each time.
RECOVERY_BACKOFF_MAX = 300.0
# A request that comes during the start-up's clean-up waits this long for it to end before it is
# refused as busy (a stale forwarder's drain can take drain_timeout; a D-Bus call gives up
# after 25 s).
SETTLE_WAIT = 10.0


class Busy(Exception):
    """A deployment is already running; the message names it."""


class NotConfigured(Exception):
    pass


class NoRollbackTarget(Exception):
    """The rollback target names no deployment or release on disk."""


class BadSignature(Exception):
    pass


class Observer(Protocol):
    def step(self, deployment: Deployment, step: Step, port: int) -> None: ...
    def finished(self, deployment: Deployment) -> None: ...
    def changed(self) -> None: ...


@dataclass(frozen=True)
class Paths:
    state: Path = Path("/var/lib/bluegreen")  # the app's own (apps.state_dir)
    runtime: Path = Path("/run/bluegreen")  # every app's: units are named by port
    config: Path = configuration.DEFAULT_PATH

    @property
    def database(self) -> Path:
        return self.state / "bluegreen.db"

    @property
    def mirror(self) -> Path:
        return self.state / "repository.git"

    @property
    def releases(self) -> Path:
        return self.state / "releases"

    @property
    def known_hosts(self) -> Path:
        return self.state / "ssh_known_hosts"

    @property
    def environments(self) -> Path:
        return self.state / "environments"


class Controller:
    def __init__(self, config: Config, systemd: Systemd, paths: Paths,
                 notify_status: Callable[[str], None] = lambda text: None,
                 secrets: Secrets | None = None, fatal: asyncio.Event | None = None,
                 port_user: PortUser = no_port_user) -> None:
        self.systemd = systemd
        self.paths = paths
        self.app = config.app_name
        self.secrets = secrets or Secrets()
        self.history = History(paths.database)
        # The file's settings (``loaded``), and those in effect (``config``): the file's, but
        # the keys that apply at the next deploy as the serving release was deployed with them.
        self.loaded = config
        self.deployed = settings.load_deployed(self.history) or config
        self.config = configuration.with_deployed(config, self.deployed)
        self.repository = Repository(config.repository.url, config.repository.branch, paths.mirror,
                                     self.secrets, paths.known_hosts)
        self.releases = Releases(paths.releases)
        self.environments = Environments(paths.environments)
        self.deployer = Deployer(systemd, Preparer(systemd, self.repository, self.releases,
                                                   self.environments),
                                 paths.runtime, self.secrets.redact, port_user)
        self.observers: list[Observer] = []
        self.notify_status = notify_status
        self.serving: Serving | None = None
        # The deployment in progress: its record, and the settings it deploys with.
        self.recorder: Recorder | None = None
        self._preparing: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.pool = pool.Pool(systemd, paths.runtime, lambda: self.config,
                              lambda: self._busy)
        systemd.on_unit_state.append(self._on_unit_state)
        self.monitor = health.Monitor(self.config.app.health_path, config.health,
                                      self._monitor_target, self._on_health_change,
                                      self.config.app.health_host, self.pool.probed)
        # The branch head whose deployment last reached an outcome: the refresher leaves it be.
        self._seen_head = self.history.get_setting(SEEN_HEAD)
        self.refresher = refresher.Refresher(
            self.repository, config.repository.poll_interval, self._refresher_deploy,
            lambda: self._seen_head)
        self._tasks: list[asyncio.Task[None]] = []
        self._refresher_task: asyncio.Task[None] | None = None
        # Set once what serves is adopted (the daemon sends READY=1 then).
        self._started = False
        self._recovery: asyncio.Task[None] | None = None
        # Set while the start-up's reconciliation stops what must not run: no deployment yet.
        self._settling = False
        self._stopping = False
        # Set when a background task ended unexpectedly: the daemon exits, systemd restarts it
        # (one event for every app's controller: the app manager's).
        self.fatal = fatal or asyncio.Event()
        self.metrics = Metrics()
        last = self.history.last_succeeded()
        self.metrics.last_success = (last.finished_at or 0.0) if last else 0.0

    # --- what entry points ask -------------------------------------------------------------

    @property
    def current(self) -> Deployment | None:
        return self.recorder.record if self.recorder is not None else None

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
    def _busy(self) -> bool:
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

    # --- deploying -------------------------------------------------------------------------

    async def request_deploy(self, ref: str, trigger: Trigger, wait: bool = False) -> Deployment:
        """Resolve ``ref`` and start deploying it; return the new record at once.

        Raises InvalidRef/UnknownRef/RepositoryError (nothing recorded, nothing changed),
        Busy while another deployment runs (unless ``wait``: then it waits for that one to
        end first), NotConfigured without a repository.
        """
        logsetup.APP.set(self.app)
        validate_ref(ref)
        await self._claim_when_idle(ref or self.config.repository.branch, wait)
        try:
            started = time.time()
            commit = self._release_on_disk(ref) or await self.repository.resolve(ref)
            deployment = self._begin(ref, trigger, commit, started)
        finally:
            self._preparing = None
        assert self.recorder is not None
        self._task = self._spawn(self._run(self.recorder), f"deploy-{deployment.id}", forever=False)
        return deployment

    def _release_on_disk(self, ref: str) -> Commit | None:
        """The commit ``ref`` names if it is a release on disk, described by its records: a
        rollback, a recovery or a start-up deploy needs no git (the remote may have dropped
        the commit by a force-push, and the mirror with it)."""
        if not re.fullmatch(r"[0-9a-f]{40}", ref) or not self.releases.exists(ref):
            return None
        record = self.history.newest_of(ref)
        if record is None:
            return None
        return Commit(ref, record.subject, record.author, timestamp=0)

    async def request_rollback(self, target: str, who: str = "", wait: bool = False) -> Deployment:
        """Deploy an earlier release: the previous good one, a deployment id or a commit.

        Only releases still on disk qualify: a rollback needs no fetch and no build. Asked
        while a deployment watches its new release (the old instance still warm) for that old
        release, it ends that deployment at once with a switch-back and returns its record.
        """
        logsetup.APP.set(self.app)
        current = self.current
        if current is not None and self._is_switch_back(current, target):
            reason = "switched back by the operator" + (f" ({who})" if who else "")
            if self.deployer.ask_switch_back(reason):
                log.warning("deployment %d: %s", current.id, reason,
                            extra=fields(deployment_id=current.id, release=current.commit))
                return current
        if wait:
            await self._wait_until_idle()
        elif self.current is not None or self._preparing is not None:
            self._claim(target)  # raises Busy, naming the running deployment
        sha = self._rollback_commit(target)
        return await self.request_deploy(sha, Trigger.ROLLBACK, wait)

    def _is_switch_back(self, current: Deployment, target: str) -> bool:
        if not current.previous_release or not current.steps or current.steps[-1].step != Step.WATCH:
            return False
        return target == "" or (len(target) >= 7 and current.previous_release.startswith(target))

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
        while self._busy:
            task = self._task
            if task is not None:
                await asyncio.wait([task])
            else:
                await asyncio.sleep(0.05)

    def _rollback_commit(self, target: str) -> str:
        serving = self.serving.release if self.serving else ""
        if target == "":
            previous = self.history.rollback_target(serving)
            if previous is None or not self.releases.exists(previous.commit):
                raise NoRollbackTarget("no earlier good release is on disk to roll back to")
            return previous.commit
        if re.fullmatch(r"[0-9a-f]{7,40}", target):
            matches = [sha for sha in self.releases.on_disk() if sha.startswith(target)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise NoRollbackTarget(f"{target!r} names several releases; give more digits")
        if target.isdigit():
            try:
                record = self.history.get(int(target))
            except KeyError:
                raise NoRollbackTarget(f"no deployment {target}") from None
            if not record.commit or not self.releases.exists(record.commit):
                raise NoRollbackTarget(f"the release of deployment {target} is no longer on disk")
            return record.commit
        raise NoRollbackTarget(f"{target!r} is neither a deployment id nor a release on disk")

    def _claim(self, what: str) -> None:
        if self._settling:
            raise Busy("the controller is still stopping what it found left over at start-up")
        if self.current is not None:
            raise Busy(f"deployment {self.current.id} ({self.current.commit[:12]}) is running")
        if self._preparing is not None:
            raise Busy(f"a deployment of {self._preparing!r} is being prepared")
        if not self.config.repository.url:
            raise NotConfigured("no repository configured: set repository.url in "
                                f"{self.config.source} or TEAM_REPO_URL")
        self._preparing = what
        self._changed()

    def _begin(self, ref: str, trigger: Trigger, commit: Commit, started: float) -> Deployment:
        serving = self.serving
        deployment = self.history.begin(
            ref or self.config.repository.branch, trigger, commit=commit.sha,
            subject=commit.subject, author=commit.author,
            previous_port=serving.port if serving else 0,
            previous_release=serving.release if serving else "", now=started)
        deployment = replace(deployment, steps=(StepTiming(str(Step.RESOLVE), started, time.time()),))
        # A reload during the deploy waits for the next one.
        self.recorder = Recorder(deployment, self.history, self.loaded, self._on_step)
        recorder.save(self.history, deployment)
        log.info("deployment %d started: %s %s (%s) by %s", deployment.id, commit.short,
                 commit.subject, deployment.ref, trigger,
                 extra=fields(message_id=MessageId.DEPLOY_STARTED, deployment_id=deployment.id,
                              release=commit.sha, trigger=trigger))
        self._changed()
        return deployment

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
            record = recorder.record
            log.error("deployment %d %s at %s: %s", record.id,
                      "switched back" if exc.state == State.SWITCHED_BACK else "failed", exc.step,
                      exc.reason,
                      extra=fields(message_id=MessageId.DEPLOY_FAILED, deployment_id=record.id,
                                   release=record.commit, port=record.port or None,
                                   step=exc.step))
        except asyncio.CancelledError:
            self._finish(recorder.finish(State.INTERRUPTED, reason="the controller was stopped"))
            raise
        except Exception as exc:  # a bug: record it, keep the daemon alive
            log.exception("deployment %d crashed", record.id)
            unsettled = True
            state, failed_step, reason = State.FAILED, "", f"internal error: {exc!r}"
        if unsettled:
            reason = f"{reason}; {await self._read_back_serving()}"
        record = recorder.finish(state, failed_step=failed_step, reason=reason)
        if state == State.SUCCEEDED:
            assert self.serving is not None
            log.info("deployment %d succeeded: %s serves on %s (%.2f s)", record.id,
                     record.commit[:12], self.serving.describe(), record.duration or 0,
                     extra=fields(message_id=MessageId.DEPLOY_SUCCEEDED, deployment_id=record.id,
                                  release=record.commit, port=record.port))
        self._finish(record)
        try:
            if record.state == State.SUCCEEDED:
                self._retain()
            else:  # what the builds of deploys that keep failing leave must not pile up
                self._prune_environments()
        except OSError as exc:
            log.error("old releases and environments stay for now: %s", exc)

    async def _read_back_serving(self) -> str:
        """After a failure that may have moved the traffic, find out from systemd which release
        serves, keep only it, and say which."""
        try:
            self.serving = await reconcile.adopt(self.systemd, self.paths.runtime, self.app)
            await reconcile.settle(self.systemd, self.paths.runtime, self.serving,
                                   self.config.drain_timeout, self.app)
            await self._adopt_pool()
        except Exception:
            log.exception("cannot tell which release serves")
            self.fatal.set()  # a restarted controller reconciles
            return "which release serves is unknown until the controller restarts"
        finally:
            self.monitor.reset()
        if self.serving is None:
            return "no release serves"
        return f"{self.serving.release[:12]} serves on {self.serving.describe()}"

    async def _adopt_pool(self) -> None:
        """After a reconciliation: start the serving release's missing workers, and know which
        of its instances the public port reaches."""
        if self.serving is None:
            self.pool.reset(None)
            return
        await self._adopt_workers(self.serving)
        targets = await control.targets(self.systemd, self.paths.runtime, self.app)
        self.pool.reset(self.serving, out=[port for port in self.serving.ports
                                           if not targets.get(port)])

    def render_metrics(self) -> str:
        self.metrics.health_check_failures = self.monitor.failures_total
        serving = self.serving
        return self.metrics.render(serving.release if serving else "", serving.port if serving else 0,
                                   self.health()[0])

    def _see_head(self, head: str) -> None:
        self._seen_head = head
        try:
            self.history.set_setting(SEEN_HEAD, head)
        except HistoryError as exc:
            log.error("%s; the refresher may deploy %s again", exc, head[:12])

    def _finish(self, record: Deployment) -> None:
        self.metrics.deployment_finished(record)
        if record.state != State.SUCCEEDED:  # the deploy's forwarder settings did not take
            control.write_env(self.paths.runtime, self.config.ports, self.config.drain_timeout,
                            self.app)
        # The refresher leaves a pushed head alone once its deployment has an outcome; an
        # interrupted one is tried again.
        if record.state != State.INTERRUPTED and (
                record.trigger == Trigger.REFRESHER or record.ref == self.config.repository.branch):
            self._see_head(record.commit)
        self.recorder = None
        self._task = None
        for observer in self.observers:
            observer.finished(record)
        self._changed()

    def _retain(self) -> None:
        """Keep release.keep releases (plus the serving one and the rollback target) and
        history_limit records."""
        serving = self.serving.release if self.serving else ""
        target = self.history.rollback_target(serving)
        protected = {serving} | ({target.commit} if target else set())
        for sha in self.releases.prune(self.history.succeeded_commits(), self.config.release.keep,
                                       protected):
            log.info("deleted release %s (release.keep = %d)", sha[:12], self.config.release.keep,
                     extra=fields(release=sha))
        self._prune_environments()
        try:
            self.history.prune(self.config.history_limit, serving)
        except HistoryError as exc:
            log.error("%s; old records stay for now", exc)

    def _prune_environments(self) -> None:
        in_use = self.environments.used_by(map(self.releases.path, self.releases.on_disk()))
        for key in self.environments.prune(in_use):
            log.info("deleted environment %s: no release on disk uses it", key)

    def _on_step(self, record: Deployment, step: Step, port: int) -> None:
        self.notify_status(f"Deploying {record.commit[:12]} (deployment {record.id}): {step}")
        for observer in self.observers:
            observer.step(record, step, port)

    def _changed(self) -> None:
        if self.current is None and self._preparing is None:
            if self.serving is not None:
                self.notify_status(f"Serving {self.serving.release[:12]} on "
                                   f"{self.serving.describe()} via port {self.config.ports.public}")
            else:
                self.notify_status("Idle: no release serves")
        for observer in self.observers:
            observer.changed()

    # --- the refresher and the push webhook ------------------------------------------------

    async def _refresher_deploy(self, head: str) -> None:
        if self.serving is not None and self.serving.release == head:
            self._see_head(head)
            return
        try:
            await self.request_deploy(head, Trigger.REFRESHER)
        except Busy:
            raise refresher.Busy() from None
        except (UnknownRef, NotConfigured, HistoryError) as exc:
            # Never let the refresher's loop die: it tries again at the next poll (the head
            # is not seen: no deployment of it has ended).
            log.error("the refresher cannot deploy %s: %s", head[:12], exc)

    def refresh(self) -> None:
        """Look at the remote now instead of at the next poll."""
        self.refresher.wake()

    def push_notification(self, payload: bytes, signature: str) -> None:
        """A push webhook: check its HMAC-SHA256 signature (X-Hub-Signature-256), then refresh."""
        secret = self.secrets.webhook_secret
        if not secret:
            raise BadSignature("no webhook secret is configured (credential webhook-secret)")
        expected = "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise BadSignature("the signature does not match the webhook secret")
        self.refresh()

    # --- health monitoring and recovery ----------------------------------------------------

    def _monitor_target(self) -> tuple[int, ...]:
        return self.serving.ports if self.serving and self.current is None else ()

    def _on_unit_state(self, unit: str, state: str) -> None:
        """systemd's news of a unit: a serving instance that died is taken out at once."""
        if instances.port_of(unit) in self.pool.members and state not in ("active", "reloading"):
            self._spawn(self.pool.instance_state(unit, state), "instance-state", forever=False)

    async def _on_health_change(self, healthy: bool, reason: str) -> None:
        self._changed()
        serving = self.serving
        if healthy or serving is None:
            if healthy:
                log.info("the serving release is healthy again: %s", reason)
            return
        log.warning("the serving release %s on %s is unhealthy: %s", serving.release[:12],
                    serving.describe(), reason,
                    extra=fields(message_id=MessageId.UNHEALTHY, release=serving.release,
                                 port=serving.port, unit=instances.unit(serving.port)))
        if self._recovery is None or self._recovery.done():
            self._recovery = self._spawn(self._recover_while_unhealthy(f"unhealthy: {reason}"),
                                         "recovery", forever=False)

    async def _recover_while_unhealthy(self, why: str) -> None:
        """Redeploy the serving release until it is healthy again (a successful deployment
        resets the monitor), waiting longer after each attempt that did not help."""
        attempts = 0
        while self._serving_unhealthy():
            if not self._busy:
                if attempts:
                    why = f"still unhealthy after {attempts} recovery attempts"
                attempts += 1
                task = await self.recover(why)
                if task is not None:
                    await asyncio.wait([task])
                if not self._serving_unhealthy():
                    return
            delay = min(RECOVERY_BACKOFF_MAX,
                        max(1.0, self.config.health.interval) * 2.0 ** max(0, attempts - 1))
            await asyncio.sleep(delay)

    def _serving_unhealthy(self) -> bool:
        return self.serving is not None and not self.monitor.healthy

    async def recover(self, why: str) -> asyncio.Task[None] | None:
        """Replace the serving instance with a fresh one of the same release, blue-green;
        return the deployment's task (None if none started)."""
        if self.serving is None or self.current is not None:
            return None
        log.warning("recovering: redeploying %s because it is %s", self.serving.release[:12], why,
                    extra=fields(message_id=MessageId.RECOVERY, release=self.serving.release))
        try:
            await self.request_deploy(self.serving.release, Trigger.RECOVERY)
        except (Busy, RepositoryError, NotConfigured, HistoryError) as exc:
            log.error("recovery not started: %s", exc)
            return None
        return self._task

    # --- the configuration -----------------------------------------------------------------

    def reload(self, loaded: Config) -> list[tuple[str, str]]:
        """Apply the app's settings as read again (appmanager.py reads every app's file);
        return each changed key with when it takes effect (at once, at the next deploy, or
        after what the admin must run)."""
        changes = [(key.dotted, str(key.applies))
                   for key in configuration.changed(self.loaded, loaded)]
        self.loaded = loaded
        self._apply(configuration.with_deployed(loaded, self.deployed if self.serving else loaded))
        for key, when in changes:
            log.info("reload: %s changed; it applies %s", key, when)
        if not changes:
            log.info("reload: no change in %s", self.paths.config)
        self._changed()
        return changes

    def _deployed_with(self, config: Config) -> None:
        """A deployment succeeded with ``config``: its deploy-time settings are in effect."""
        self.deployed = config
        settings.save_deployed(self.history, config)
        self._apply(configuration.with_deployed(self.loaded, config))

    def _apply(self, config: Config) -> None:
        """Make ``config`` the settings in effect, in every part that holds some."""
        old, self.config = self.config, config
        self.monitor.settings = config.health
        self.monitor.path, self.monitor.host = config.app.health_path, config.app.health_host
        self.repository.url, self.repository.branch = config.repository.url, config.repository.branch
        interval = self.refresher.interval
        self.refresher.interval = config.repository.poll_interval
        if old.drain_timeout != config.drain_timeout or old.ports != config.ports:
            control.write_env(self.paths.runtime, config.ports, config.drain_timeout, self.app)
        if old.repository.ssh_known_hosts != config.repository.ssh_known_hosts:
            self._write_known_hosts()
        if self._started and not self._settling:  # else the start-up's end watches the remote
            self._watch_remote()
            if self._refresher_task is not None and interval != config.repository.poll_interval:
                self.refresher.wake()  # poll now, then at the new interval

    def _write_known_hosts(self) -> None:
        """The ssh host keys git may trust: repository.ssh_known_hosts, in ssh's own file."""
        known_hosts = self.config.repository.ssh_known_hosts
        atomic_write(self.paths.known_hosts, known_hosts + ("\n" if known_hosts else ""))

    def _watch_remote(self) -> None:
        """Run the refresher when the configuration asks for it, and only then."""
        wanted = bool(self.config.repository.url and self.config.repository.watch)
        running = self._refresher_task is not None and not self._refresher_task.done()
        if wanted and not running:
            self._refresher_task = self._spawn(self.refresher.run(), "refresher")
        elif running and not wanted:
            assert self._refresher_task is not None
            self._refresher_task.cancel()
            self._refresher_task = None

    async def pending_settings(self) -> list[tuple[str, str]]:
        """Settings of the file not in effect yet, each with what applies it."""
        pending = settings.pending_until_deploy(self.config, self.loaded) if self.serving else []
        if await settings.api_socket_pending(self.systemd, self.loaded.api.listen):
            pending.append(("api.listen", str(configuration.Applies.API_SOCKET)))
        return pending

    # --- start-up and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what systemd runs; the rest of the start-up (stopping what must not run, a
        deployment if nothing serves, the refresher) goes on in the background, so that the
        controller is ready at once."""
        control.write_env(self.paths.runtime, self.config.ports, self.config.drain_timeout,
                            self.app)
        self._write_known_hosts()
        try:
            if control.ensure_migrate_req():
                log.info("set net.ipv4.tcp_migrate_req=1 (switches keep queued connections)")
        except control.ForwarderError as exc:
            log.error("%s; deployments will fail at the switch", exc)
        reconcile.mark_interrupted(self.history)
        self._forget_interrupted_head()
        self.serving = await reconcile.adopt(self.systemd, self.paths.runtime, self.app)
        self.pool.reset(self.serving)
        self._settling = True
        self._spawn(self.monitor.run(), "health-monitor")
        self._spawn(self._settle(), "start-up", forever=False)
        self._started = True  # the daemon sends READY=1 next
        self._changed()

    async def _settle(self) -> None:
        try:
            await reconcile.settle(self.systemd, self.paths.runtime, self.serving,
                                   self.config.drain_timeout, self.app)
            await self._adopt_pool()
            await transient.settle_orphans(self.systemd, self.app, self.config.release.timeout)
            self.releases.remove_incomplete()  # once no build writes into them
        finally:
            self._settling = False
            self._changed()
        if self.serving is None and self.config.repository.url:
            await self._startup_deploy()
        self._watch_remote()

    def _forget_interrupted_head(self) -> None:
        """A head whose newest deployment was interrupted has no outcome yet: deploy it again."""
        if not self._seen_head:
            return
        newest = self.history.newest_of(self._seen_head)
        if newest is not None and newest.state == State.INTERRUPTED:
            self._seen_head = None

    def _spawn(self, work: Coroutine[Any, Any, None], name: str, *,
               forever: bool = True) -> asyncio.Task[None]:
        """Run ``work`` in the background. Should it fail (or, ``forever``, end at all) while
        the controller is not stopping, the daemon exits and systemd restarts it: a background
        loop never dies silently."""
        context = contextvars.copy_context()
        context.run(logsetup.APP.set, self.app)  # its log lines name the app
        task = asyncio.create_task(work, name=name, context=context)
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._task_done(done, forever))
        return task

    def _task_done(self, task: asyncio.Task[None], forever: bool) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        if error is None and not forever:
            return
        log.critical("the background task %s ended%s; exiting so that systemd restarts the "
                     "controller", task.get_name(), f": {error!r}" if error else "",
                     exc_info=error)
        self.fatal.set()

    async def _adopt_workers(self, serving: Serving) -> None:
        """Start the serving release's workers that do not run (a controller that died between
        the switch and the workers step left them unstarted)."""
        env = instances.read_app_environment(self.paths.runtime, serving.port)
        release_dir = env.get("BLUEGREEN_RELEASE_DIR", "")
        if not release_dir:
            return
        try:
            wanted = procfile.processes(Path(release_dir), self.config.release.migrate_command,
                                        self.config.processes).workers
        except procfile.ProcfileError as exc:
            log.error("workers of %s not adopted: %s", serving.release[:12], exc)
            return
        running = {w.name for w in await workers.listing(self.systemd, self.paths.runtime, self.app)
                   if w.port == serving.port and w.state.startswith(("active", "activating"))}
        missing = {name: command for name, command in wanted.items() if name not in running}
        if missing:
            log.warning("starting the workers %s of the serving release %s", ", ".join(missing),
                        serving.release[:12])
            await workers.start(self.systemd, self.paths.runtime, serving.port, missing, env,
                                self.config.app.network, self.app)

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
        await reconcile.settle(self.systemd, self.paths.runtime, None, self.config.drain_timeout,
                               self.app)

    async def stop(self) -> None:
        self._stopping = True
        # An app removed by a reload stops for good: its units are no longer its to watch
        # (another app may start instances on their ports).
        with contextlib.suppress(ValueError):
            self.systemd.on_unit_state.remove(self._on_unit_state)
        self.pool.reset(None)
        for task in list(self._tasks):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.history.close()
