"""One controller, many apps: a Controller per app, on the bus at /org/bluegreen1 (the default
app) and /org/bluegreen1/app/NAME (each other app).

The apps run side by side: deployments of different apps may run at once, each app still one
at a time. A reload reads every file again and applies them all or nothing: a new app file adds
the app (its controller starts, deploying its branch), a removed one stops the app's units
(its records, releases and data stay until the admin deletes them). Apps removed go first, so
that a new app may take over the public port of one it replaces.

A public port serves one app: a reload whose files would put an app on a port another app
still serves (a changed ports.public applies at the next deploy) is refused, and so is a
deploy that would start forwarders there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path

from dbus_next.aio import MessageBus

from bluegreen import apps, certificates, front
from bluegreen import log as logsetup
from bluegreen.api.dbus import ManagerInterface
from bluegreen.api.names import object_path
from bluegreen.config import DEFAULT_APP, Config, ConfigError, FrontConfig
from bluegreen.controller import Controller
from bluegreen.credentials import Secrets
from bluegreen.forwarders import control
from bluegreen.parts import Paths, build
from bluegreen.systemd import Systemd

log = logging.getLogger(__name__)

# How long a first handshake may wait for the ACME CA to issue the domain's certificate.
WARM_TIMEOUT = 60.0


def _unsaid(text: str) -> None:
    pass


class AppManager:
    def __init__(self, systemd: Systemd, paths: Paths, apps_dir: Path = apps.APPS_DIR,
                 bus: MessageBus | None = None, secrets: Secrets | None = None,
                 notify_status: Callable[[str], None] = lambda text: None,
                 notify: Callable[[str], None] = lambda line: None) -> None:
        self.systemd = systemd
        self.paths = paths  # the default app's
        self.apps_dir = apps_dir
        self.bus = bus
        self.secrets = secrets or Secrets()
        self.notify_status = notify_status
        self.notify = notify
        self.controllers: dict[str, Controller] = {}
        # Set when any app's controller meets an internal error: the daemon exits.
        self.fatal = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._front = asyncio.Lock()  # one change of the front at a time (front.py)
        self._tasks: set[asyncio.Task[None]] = set()  # first handshakes with the front
        self._started = False  # READY=1 sent: a reload then tells systemd it is reloading

    def load(self) -> dict[str, Config]:
        """Every app's settings; raises ConfigError (nothing changes then)."""
        return apps.load(self.paths.config, self.apps_dir)

    def add(self, config: Config) -> Controller:
        """A Controller for the app (not started yet), on the bus."""
        name = config.app_name
        paths = self.paths
        if name != DEFAULT_APP:
            paths = replace(self.paths, state=apps.state_dir(name, self.paths.state),
                            config=self.apps_dir / f"{name}.toml")
        paths.state.mkdir(parents=True, exist_ok=True)
        # The daemon's status line is the default app's.
        status = self.notify_status if name == DEFAULT_APP else _unsaid
        parts = build(config, self.systemd, paths, self.secrets, self.port_user)
        controller = Controller(config, self.systemd, paths, parts, notify_status=status,
                                fatal=self.fatal)
        self.controllers[name] = controller
        controller.observers.append(front.AfterDeploy(self.apply_front))
        interface = ManagerInterface(controller, self.reload, self.bus)
        if self.bus is not None:
            self.bus.export(object_path(name), interface)
        return controller

    async def start(self) -> None:
        """Start every app added: each adopts what systemd runs of it."""
        await asyncio.gather(*(self._start(name, controller)
                               for name, controller in self.controllers.items()))
        await self.apply_front()
        self._started = True  # the daemon sends READY=1 next

    @staticmethod
    async def _start(name: str, controller: Controller) -> None:
        with logsetup.app_label(name):
            await controller.start()

    async def reload(self) -> list[tuple[str, str]]:
        """Read every file again; return each change ("NAME: KEY" for an app other than the
        default one) with when it applies. A bad file raises ConfigError: nothing changes."""
        async with self._reloading:
            try:
                configs = self.load()
                apps.check_served_ports(configs, await self.served_ports(staying=configs))
            except ConfigError as exc:
                log.error("reload refused, the settings stay as they were: %s", exc)
                raise
            # Before READY=1 at start-up, systemd is not told about the reload.
            notify = self.notify if self._started else (lambda line: None)
            notify("RELOADING=1")
            try:
                changes = await self._apply(configs)
                await self.apply_front()
                return changes
            finally:
                notify("READY=1")

    async def apply_front(self) -> None:
        """The HTTPS front serves every app's domains as the settings in effect say: the
        domains and [front] of the files, each app's public port (front.py)."""
        async with self._front:
            default = self.controllers.get(DEFAULT_APP)
            settings = default.settings.in_effect.front if default is not None else FrontConfig()
            served = front.sites((controller.settings.in_effect, controller.settings.in_file)
                                 for controller in self.controllers.values())
            done = await front.apply(self.systemd, self.paths.runtime, served, settings)
        if done in ("started", "reloaded", "domains"):
            domains = [domain for site in served for domain in site.domains]
            task = asyncio.get_running_loop().create_task(self._warm(domains), name="certificates")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _warm(domains: list[str]) -> None:
        """The front gets a domain's certificate at the first handshake that names it: make
        that handshake now, not a client's, and say in the journal what came of it. All at
        once: a name the CA refuses keeps its handshake waiting, not the others'."""
        await asyncio.gather(*(AppManager._warm_one(domain) for domain in domains))

    @staticmethod
    async def _warm_one(domain: str) -> None:
        got = await asyncio.to_thread(certificates.served, domain, None, WARM_TIMEOUT)
        if got is not None:
            log.info("the front has a certificate for %s from %s, valid until %s", domain,
                     got.issuer, time.strftime("%Y-%m-%d", time.gmtime(got.not_after)))
            return
        reason = await asyncio.to_thread(certificates.journal_error, domain)
        log.warning("the front has no certificate for %s yet: %s", domain,
                    reason or f"the ACME CA has not answered (journalctl -u {front.UNIT} says more)")

    async def served_ports(self, staying: Collection[str] | None = None) -> dict[str, set[int]]:
        """The public ports each app's forwarders serve, or will serve: while a release serves,
        the port in effect; while a deployment runs, the one it switches to as well; while any
        of its forwarders runs, the one their settings name (systemd restarts one there).
        Apps not ``staying`` (a reload removes them first) are left out."""
        served: dict[str, set[int]] = {}
        for name, controller in self.controllers.items():
            if staying is not None and name not in staying:
                continue
            ports = served[name] = set()
            in_effect = controller.settings.in_effect.ports.public
            if controller.serving is not None or controller.current is not None:
                ports.add(in_effect)
            if controller.recorder is not None:  # the port the deployment switches to
                ports.add(controller.recorder.config.ports.public)
            runtime = controller.paths.runtime
            if await control.targets(self.systemd, runtime, name):
                ports.add(control.written_public_port(runtime, name) or in_effect)
        return served

    async def port_user(self, app: str, port: int) -> str | None:
        """The other app whose forwarders serve ``port``, if any (a deploy of ``app`` must not
        start its forwarders there)."""
        return apps.port_user(app, port, await self.served_ports())

    async def _apply(self, configs: dict[str, Config]) -> list[tuple[str, str]]:
        changes: list[tuple[str, str]] = []
        for name in [name for name in self.controllers if name not in configs]:
            with logsetup.app_label(name):
                await self.remove(name)
            changes.append((f"app {name}", "removed: its units are stopped, its data kept"))
        for name, config in configs.items():
            controller = self.controllers.get(name)
            with logsetup.app_label(name):
                if controller is None:
                    log.info("reload: new app %s (%s)", name, config.source)
                    await self.add(config).start()
                    changes.append((f"app {name}", "added"))
                    continue
                for key, when in controller.reload(config):
                    changes.append((key if name == DEFAULT_APP else f"{name}: {key}", when))
        return changes

    async def remove(self, name: str) -> None:
        controller = self.controllers.pop(name)
        if self.bus is not None:
            self.bus.unexport(object_path(name))
        log.info("reload: the app %s is gone; its records, releases and data stay in %s",
                 name, controller.paths.state)
        await controller.remove()

    async def stop(self) -> None:
        for name, controller in self.controllers.items():
            try:
                await controller.stop()
            except Exception:  # the others still stop
                log.exception("the app %s did not stop cleanly", name)
