"""The D-Bus API: org.bluegreen1.Manager at /org/bluegreen1 on the system bus (the default
app), and at /org/bluegreen1/app/NAME for each other app; org.bluegreen1.Apps at
/org/bluegreen1 lists them. Runs in the controller (bluegreen.service).

Root and the bluegreen group may deploy; everyone may read (see org.bluegreen1.conf).
Deployments are a{sv} dictionaries; every step of a deployment is a DeploymentStep signal,
sent from the object of the deployment's app.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

from dbus_next import DBusError, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from bluegreen import certificates, front, instances, maintenance, workers
from bluegreen.api.names import APPS_INTERFACE, INTERFACE, Error, object_path
from bluegreen.config import ConfigError, parse_share
from bluegreen.controller import Controller
from bluegreen.history import Deployment, HistoryError, Step, Trigger
from bluegreen.log import fields
from bluegreen.refusals import BadSignature, Busy, NoCanary, NoRollbackTarget, NotConfigured
from bluegreen.release.repository import InvalidRef, RepositoryError, UnknownRef
from bluegreen.systemd import ActiveState, SystemdError

log = logging.getLogger(__name__)

# What a request to deploy may be refused with (a subclass before its base).
_REFUSALS: dict[type[Exception], Error] = {
    NoRollbackTarget: Error.NO_ROLLBACK_TARGET,
    Busy: Error.BUSY,
    InvalidRef: Error.INVALID_REF,
    UnknownRef: Error.UNKNOWN_REF,
    NotConfigured: Error.NOT_CONFIGURED,
    RepositoryError: Error.REPOSITORY,
    HistoryError: Error.RECORDS,
}


def _refusal(exc: Exception) -> Error:
    return next(error for kind, error in _REFUSALS.items() if isinstance(exc, kind))


def failure(error: Error, message: str) -> DBusError:
    """The D-Bus error a method raises for ``error``."""
    return DBusError(error.dbus_name, message)


# Properties announced with PropertiesChanged when the controller reports a change.
_CHANGING = ("State", "ActiveRelease", "ActivePort", "PublicPort", "CurrentDeployment",
             "LastDeployment", "Healthy", "HealthReason", "Maintenance", "MaintenanceMessage")

_CLIENT_TRIGGERS = {Trigger.DBUS, Trigger.HTTP, Trigger.CLI}

# The unique bus name of the caller of the method being dispatched: a message handler sets it
# just before dbus-next dispatches the call, whose task copies the context.
_SENDER: ContextVar[str] = ContextVar("sender", default="")


def remember_sender(message: Message) -> bool:
    if message.message_type == MessageType.METHOD_CALL and message.interface in (INTERFACE,
                                                                                   APPS_INTERFACE):
        _SENDER.set(message.sender or "")
    return False


def _options(options: dict[str, Variant], canary_ok: bool = False
             ) -> tuple[Trigger, bool, float | None]:
    """``trigger`` (s: dbus, http or cli), ``wait`` (b) and, for a deploy, ``canary`` (d: the
    share of new connections the new release takes first, from 0 to below 1) of a
    *WithOptions call."""
    trigger, wait, canary = Trigger.DBUS, False, None
    for key, value in options.items():
        if key == "trigger" and value.signature == "s" and value.value in _CLIENT_TRIGGERS:
            trigger = Trigger(value.value)
        elif key == "wait" and value.signature == "b":
            wait = bool(value.value)
        elif key == "canary" and canary_ok and value.signature == "d":
            try:
                canary = parse_share(value.value)
            except ValueError as exc:
                raise failure(Error.INVALID_ARGUMENT, f"canary: {exc}") from None
        else:
            raise failure(Error.INVALID_ARGS, f"unknown or invalid option {key!r}")
    return trigger, wait, canary


def deployment_to_variant(d: Deployment) -> dict[str, Variant]:
    return {
        "id": Variant("s", str(d.id)),
        "ref": Variant("s", d.ref),
        "trigger": Variant("s", d.trigger),
        "state": Variant("s", d.state),
        "commit": Variant("s", d.commit),
        "subject": Variant("s", d.subject),
        "author": Variant("s", d.author),
        "port": Variant("q", d.port),
        "previous_port": Variant("q", d.previous_port),
        "previous_release": Variant("s", d.previous_release),
        "started_at": Variant("d", d.started_at),
        "finished_at": Variant("d", d.finished_at or 0.0),
        "failed_step": Variant("s", d.failed_step),
        "reason": Variant("s", d.reason),
        "steps": Variant("a(sdd)", [[s.step, s.started, s.finished or 0.0] for s in d.steps]),
        "web_steps": Variant("as", list(d.web_steps)),
    }


Reload = Callable[[], Awaitable[list[tuple[str, str]]]]


class ManagerInterface(ServiceInterface):
    def __init__(self, controller: Controller, reload: Reload,
                 bus: MessageBus | None = None) -> None:
        super().__init__(INTERFACE)
        self.controller = controller
        self.bus = bus
        self._reload = reload
        self._last: dict[str, Any] = {}
        controller.observers.append(self)

    # --- observer of the controller --------------------------------------------------------

    def step(self, deployment: Deployment, step: Step, port: int) -> None:
        self.DeploymentStep(str(deployment.id), str(step), deployment.commit, port)
        self.changed()

    def finished(self, deployment: Deployment) -> None:
        self.DeploymentFinished(str(deployment.id), deployment.state, deployment.failed_step,
                                deployment.reason)

    def changed(self) -> None:
        current = self._properties()
        diff = {name: value for name, value in current.items() if self._last.get(name) != value}
        self._last = current
        if diff:
            self.emit_properties_changed(diff)

    def _properties(self) -> dict[str, Any]:
        """The properties that change, as their getters give them."""
        return {name: getattr(self, name) for name in _CHANGING}

    # --- methods ---------------------------------------------------------------------------

    async def _caller(self, trigger: Trigger) -> str:
        """Who calls, for the records: "user NAME (uid N) over cli"."""
        sender = _SENDER.get()
        if self.bus is None or not sender:
            return f"over {trigger}"
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionUnixUser", signature="s",
            body=[sender]))
        if reply is None or reply.message_type == MessageType.ERROR:
            return f"over {trigger}"
        uid = int(reply.body[0])
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return f"user {name} (uid {uid}) over {trigger}"

    async def _deploy(self, ref: str, trigger: Trigger, rollback: bool = False,
                      wait: bool = False, canary: float | None = None) -> str:
        try:
            if rollback:
                deployment = await self.controller.request_rollback(
                    ref, await self._caller(trigger), wait)
            else:
                deployment = await self.controller.request_deploy(ref, trigger, wait, canary)
        except tuple(_REFUSALS) as exc:
            raise failure(_refusal(exc), str(exc)) from None
        return str(deployment.id)

    @method()
    async def Deploy(self, ref: "s") -> "s":
        """Deploy ``ref`` (a branch, tag or commit; empty: the branch head); return its id."""
        return await self._deploy(ref, Trigger.DBUS)

    @method()
    async def DeployWithOptions(self, ref: "s", options: "a{sv}") -> "s":
        """Deploy with options: ``trigger`` (s) is one of dbus, http, cli; ``wait`` (b): while
        another deployment runs, wait for it to end, then go (instead of Busy); ``canary`` (d):
        the share of new connections the new release takes first, from 0 (no canary) to below
        1, instead of canary.share."""
        trigger, wait, canary = _options(options, canary_ok=True)
        return await self._deploy(ref, trigger, wait=wait, canary=canary)

    @method()
    async def Rollback(self, target: "s") -> "s":
        """Deploy an earlier release still on disk: ``target`` is empty (the previous good
        release), a deployment id or a commit; return the new deployment's id."""
        return await self._deploy(target, Trigger.DBUS, rollback=True)

    @method()
    async def RollbackWithOptions(self, target: "s", options: "a{sv}") -> "s":
        """Rollback with the options of DeployWithOptions. Asked while a deployment watches its
        new release, it ends that deployment with a switch-back to the old instance, still
        warm, and returns that deployment's id."""
        trigger, wait, _ = _options(options)
        return await self._deploy(target, trigger, rollback=True, wait=wait)

    @method()
    async def Promote(self) -> "s":
        """End the canary under way early with a promotion (the switch, drain and watch
        follow); return its deployment's id. NoCanary when none runs."""
        try:
            deployment = self.controller.request_promote(await self._caller(Trigger.DBUS))
        except NoCanary as exc:
            raise failure(Error.NO_CANARY, str(exc)) from None
        return str(deployment.id)

    @method()
    def Refresh(self):
        """Look at the remote branch now."""
        self.controller.refresh()

    # Methods that raise DBusError are async: see daemon._quiet_replied_errors.

    @method()
    async def NotifyPush(self, payload: "ay", signature: "s"):
        """A push webhook's body and its X-Hub-Signature-256 header; a valid one refreshes."""
        try:
            self.controller.push_notification(bytes(payload), signature)
        except BadSignature as exc:
            raise failure(Error.BAD_SIGNATURE, str(exc)) from None

    @method()
    async def Reload(self) -> "a(ss)":
        """Read bluegreen.toml again; return each changed key with when it applies ("at once",
        "at the next deploy", or the commands that apply it). A bad file changes nothing and
        fails with BadConfiguration, naming the file, line, key and reason."""
        try:  # every app's file, not this app's alone
            return [list(change) for change in await self._reload()]
        except ConfigError as exc:
            raise failure(Error.BAD_CONFIGURATION, str(exc)) from None

    @method()
    async def ListPendingSettings(self) -> "a(ss)":
        """Settings of bluegreen.toml not in effect yet, each with what applies it."""
        return [list(pending) for pending in await self.controller.pending_settings()]

    @method()
    async def GetDeployment(self, deployment_id: "s") -> "a{sv}":
        if not deployment_id.isdigit():
            raise failure(Error.NO_SUCH_DEPLOYMENT, f"no deployment {deployment_id!r}")
        try:
            return deployment_to_variant(self.controller.history.get(int(deployment_id)))
        except KeyError:
            raise failure(Error.NO_SUCH_DEPLOYMENT, f"no deployment {deployment_id}") from None

    @method()
    def ListDeployments(self, limit: "u") -> "aa{sv}":
        """The most recent deployments, newest first (limit 0: 20)."""
        limit = min(limit or 20, 1000)
        return [deployment_to_variant(d) for d in self.controller.history.recent(limit)]

    @method()
    def GetMetrics(self) -> "s":
        """The controller's counters in the Prometheus text format."""
        return self.controller.render_metrics()

    @method()
    async def ListInstances(self) -> "a(qss)":
        """Every loaded instance of the app: port, systemd state, release."""
        c = self.controller
        result = []
        for status in await c.systemd.list_units(instances.PATTERN):
            port = instances.port_of(status.name)
            if port is None:
                continue
            settings = instances.read_env(c.paths.runtime, port)
            if instances.app_named(settings) == c.app:
                result.append([port, status.active_state, settings.get("BLUEGREEN_RELEASE", "")])
        return sorted(result)

    @method()
    async def ListWorkers(self) -> "a(qsss)":
        """Every loaded worker unit of the app: its release's port, process type, systemd
        state, release."""
        c = self.controller
        return [[w.port, w.name, w.state, w.release]
                for w in await workers.listing(c.systemd, c.paths.runtime, c.app)]

    @method()
    async def ListDomains(self) -> "a(ssds)":
        """Each of the app's domains with the certificate the front serves for it: issuer and
        expiry (seconds since the epoch), or "", 0 and why it has none."""
        domains = self.controller.settings.in_effect.app.domains
        if not domains:
            return []
        try:  # serving, as front.apply reckons: not failing nor waiting to be restarted
            state = (await self.controller.systemd.status(front.UNIT)).active_state
            running = state in (ActiveState.ACTIVE, ActiveState.RELOADING)
        except SystemdError:
            running = False
        # Handshakes with the front and its journal: off the event loop.
        listed = await asyncio.to_thread(certificates.describe, domains, running,
                                         certificates.served, certificates.journal_error)
        return [[d.domain, d.issuer, d.not_after, d.reason] for d in listed]

    @method()
    async def SetMaintenance(self, on: "b", message: "s"):
        """Turn maintenance on (see _set_maintenance)."""
        await self._set_maintenance(on, message)

    async def _set_maintenance(self, on: bool, message: str) -> None:
        """Turn maintenance on (the front answers every request for the app's domains with a
        503 page showing ``message``, or a default one) or off. Only the front serves it: the
        app needs domains; its own port and bluegreen's health checks are untouched."""
        app = self.controller.app
        if on and not self.controller.settings.in_effect.app.domains:
            raise failure(Error.NOT_CONFIGURED,
                          f"the app {app} has no domains (app.domains): the maintenance page "
                          "is served by the HTTPS front, for the app's domains only")
        caller = await self._caller(Trigger.DBUS)
        try:
            if on:
                state = maintenance.turn_on(app, message)
                log.info("maintenance on for %s, %s: %s", app, caller, state.message,
                         extra=fields(app=app))
            elif maintenance.turn_off(app):
                log.info("maintenance off for %s, %s", app, caller, extra=fields(app=app))
        except maintenance.MaintenanceError as exc:
            raise failure(Error.INVALID_ARGUMENT, str(exc)) from None
        except OSError as exc:
            raise failure(Error.RECORDS, f"the maintenance page cannot be written: {exc}") from None
        self.changed()

    # --- properties ------------------------------------------------------------------------

    @dbus_property(access=PropertyAccess.READ)
    def App(self) -> "s":
        """The app's name ("default": bluegreen.toml's)."""
        return self.controller.app

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        """starting, idle, deploying, serving or unhealthy."""
        return str(self.controller.state)

    @dbus_property(access=PropertyAccess.READ)
    def ActiveRelease(self) -> "s":
        serving = self.controller.serving
        return serving.release if serving else ""

    @dbus_property(access=PropertyAccess.READ)
    def ActivePort(self) -> "q":
        serving = self.controller.serving
        return serving.port if serving else 0

    @dbus_property(access=PropertyAccess.READ)
    def PublicPort(self) -> "q":
        return self.controller.settings.in_effect.ports.public

    @dbus_property(access=PropertyAccess.READ)
    def CurrentDeployment(self) -> "s":
        current = self.controller.current
        return str(current.id) if current else ""

    @dbus_property(access=PropertyAccess.READ)
    def LastDeployment(self) -> "s":
        last = self.controller.last_deployment()
        return str(last.id) if last else ""

    @dbus_property(access=PropertyAccess.READ)
    def Healthy(self) -> "b":
        return self.controller.health()[0]

    @dbus_property(access=PropertyAccess.READ)
    def HealthReason(self) -> "s":
        return self.controller.health()[1]

    @dbus_property(access=PropertyAccess.READ)
    def Repository(self) -> "s":
        return self.controller.repository.public_url

    @dbus_property(access=PropertyAccess.READ)
    def Branch(self) -> "s":
        return self.controller.settings.in_effect.repository.branch

    @dbus_property(access=PropertyAccess.READ)
    def Watching(self) -> "b":
        """Whether new commits of the branch are deployed by themselves."""
        return bool(self.controller.settings.in_effect.repository.url
                    and self.controller.settings.in_effect.repository.watch)

    @dbus_property(access=PropertyAccess.READ)
    def RemoteError(self) -> "s":
        """Why the remote could not be read at the last poll ("" when it could)."""
        return self.controller.refresher.last_error

    @dbus_property(access=PropertyAccess.READ)
    def DeploymentsFinished(self) -> "a{su}":
        """Deployments finished since the controller started, by result."""
        return self.controller.metrics.by_result()

    @dbus_property(access=PropertyAccess.READ)
    def Maintenance(self) -> "b":
        """Whether the front answers the app's domains with its maintenance page."""
        return maintenance.current(self.controller.app) is not None

    @dbus_property(access=PropertyAccess.READ)
    def MaintenanceMessage(self) -> "s":
        state = maintenance.current(self.controller.app)
        return state.message if state else ""

    @dbus_property(access=PropertyAccess.READ)
    def Canary(self) -> "a{sv}":
        """The canary under way (empty when none runs): ``share`` asked and ``measured_share``
        of the answers (d), each release's ``canary_requests``, ``canary_errors``,
        ``stable_requests``, ``stable_errors`` (t: answers since it began, and their 5xx),
        ``elapsed`` and ``duration`` (d, seconds)."""
        reading = self.controller.canary()
        if reading is None:
            return {}
        return {name: Variant("d" if isinstance(value, float) else "t", value)
                for name, value in reading.to_dict().items()}

    # --- signals ---------------------------------------------------------------------------

    @signal()
    def DeploymentStep(self, deployment_id: "s", step: "s", release: "s", port: "q") -> "sssq":
        return [deployment_id, step, release, port]

    @signal()
    def DeploymentFinished(self, deployment_id: "s", state: "s", failed_step: "s",
                           reason: "s") -> "ssss":
        return [deployment_id, state, failed_step, reason]


class AppsInterface(ServiceInterface):
    """org.bluegreen1.Apps at /org/bluegreen1: the apps this controller runs."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        super().__init__(APPS_INTERFACE)
        self.names = names

    @method()
    def ListApps(self) -> "a(so)":
        """Each app's name and the object of its Manager interface, the default app first."""
        return [[name, object_path(name)] for name in self.names()]
