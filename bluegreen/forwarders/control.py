"""The forwarder carries the public port to instance PORT: bluegreen-forward@PORT.service
(socat, the default), bluegreen-proxy@PORT.service (the built-in one, see forwarders/proxy.py), or one
bluegreen-haproxy.service for every port (see forwarders/haproxy.py), or none at all: the
instances listen on the public port themselves (forwarder = "direct", see
forwarders/direct.py). This module runs in the controller.

Retargeting never closes the public port. The TCP forwarders: the new one starts listening
beside the old one (SO_REUSEPORT), then the old one is stopped with a drain (see
forwarders/hook.py). That needs net.ipv4.tcp_migrate_req=1, or the kernel resets the connections
queued on the old listener. HAProxy keeps its listener: its runtime API adds the new instance
and drains the old one. Whatever the kind, a switch is ``start`` then ``drain_stop``.

The controller's parts (the deploy flow, the pool, the reconciliation) move an app's forwarders
through one ``Forwarders`` object, which follows the app's current settings and alone writes
the settings file its forwarder units read.

The forwarder units read the default app's settings (public port, address, drain timeout) from
``forwarder.env``; a forwarder of another app reads its app's ``apps/NAME/forwarder.env`` too,
through the link ``forwarders/PORT.env`` made before it starts: that is also how it is known
to be that app's. HAProxy serves the default app only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from bluegreen import instances, sockdiag
from bluegreen.config import DEFAULT_APP, Config, Forwarder
from bluegreen.files import atomic_write, environment_file, read_environment_file
from bluegreen.forwarders import direct, haproxy
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


_TEMPLATE = {Forwarder.SOCAT: "bluegreen-forward@{}.service", Forwarder.PROXY: "bluegreen-proxy@{}.service"}
PATTERNS = tuple(template.format("*") for template in _TEMPLATE.values())
_NAME = re.compile(r"bluegreen-(?:forward|proxy)@(\d{1,5})\.service")


class ForwarderError(Exception):
    pass


def unit(port: int, kind: Forwarder = Forwarder.SOCAT) -> str:
    if kind == Forwarder.DIRECT:
        return direct.socket_unit(port)
    return haproxy.UNIT if kind == Forwarder.HAPROXY else _TEMPLATE[kind].format(port)


def port_of(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match[1]) if match else None


def trusted_proxies(config: Config) -> str:
    """Whom the instances believe the X-Forwarded-* headers from (gunicorn's
    --forwarded-allow-ips): app.forwarded_allow_ips, or haproxy on 127.0.0.1, which sets them
    itself; a TCP forwarder passes on whatever the client sent, so then nobody by default."""
    if config.app.forwarded_allow_ips or config.forwarder != Forwarder.HAPROXY:
        return config.app.forwarded_allow_ips
    return "127.0.0.1"


def ensure_migrate_req(path: Path = MIGRATE_REQ) -> bool:
    """Make sure net.ipv4.tcp_migrate_req is 1; return True if it had to be set.

    Raises ForwarderError when it is 0 and cannot be set: switching would then reset the
    connections waiting on the old listener, so bluegreen refuses to switch at all.
    """
    try:
        if path.read_text().strip() == "1":
            return False
    except FileNotFoundError:
        raise ForwarderError(
            f"{path} does not exist: this kernel (before 5.14) cannot move queued connections "
            "between listeners, so a switch would reset them") from None
    try:
        path.write_text("1\n")
    except OSError as exc:
        raise ForwarderError(
            f"net.ipv4.tcp_migrate_req is 0 and setting it failed ({exc.strerror}); "
            "set it to 1 (sysctl -w net.ipv4.tcp_migrate_req=1, or a file in /etc/sysctl.d)") from None
    return True


def ipv6_available() -> bool:
    """Whether this kernel has IPv6 at all (not so when booted with ipv6.disable=1)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def listen_address(public_address: str, ipv6: bool = True, served: tuple[str, ...] = ()) -> str:
    """The address the forwarders bind: ``public_address``, but "::" (both stacks) falls back
    to every IPv4 address on a kernel without IPv6.

    Unset, it is "::", unless the public port is already served on "0.0.0.0" alone (by an
    earlier bluegreen, whose forwarders listened there): a listener of another address is in
    another SO_REUSEPORT group, so the old listener would keep every IPv4 connection until its
    drain, and the connections queued on it then could not move to the new one.
    """
    if not public_address:
        keep = "0.0.0.0" in served and "::" not in served
        public_address = "0.0.0.0" if keep else "::"
    return "0.0.0.0" if public_address == "::" and not ipv6 else public_address


def served_addresses(port: int) -> tuple[str, ...]:
    """The addresses listeners on ``port`` are bound to now."""
    try:
        return tuple(sorted({sock.local_address for sock in sockdiag.listeners(port)}))
    except OSError as exc:
        log.warning("cannot list the listeners of port %d: %s", port, exc)
        return ()


def socat_listen(address: str, port: int) -> str:
    """socat's listening address for ``address``: "::" is both stacks (IPV6_V6ONLY off)."""
    if address == "::":
        return f"TCP6-LISTEN:{port},ipv6-v6only=0"
    if ":" in address:
        return f"TCP6-LISTEN:{port},bind=[{address}],ipv6-v6only=1"
    return f"TCP4-LISTEN:{port},bind={address}"


def env_path(run_dir: Path, app: str = DEFAULT_APP) -> Path:
    """The settings file of an app's forwarders."""
    return run_dir / "forwarder.env" if app == DEFAULT_APP else run_dir / "apps" / app / "forwarder.env"


def link_path(run_dir: Path, port: int) -> Path:
    """What the forwarder to ``port`` reads after forwarder.env: its app's settings (a link)."""
    return run_dir / "forwarders" / f"{port}.env"


def written_public_port(run_dir: Path, app: str = DEFAULT_APP) -> int | None:
    """The public port the app's forwarder units read: a forwarder started (or restarted by
    systemd) listens there."""
    value = read_environment_file(env_path(run_dir, app)).get("BLUEGREEN_PUBLIC_PORT", "")
    return int(value) if value.isdigit() else None


def _link(run_dir: Path, port: int, app: str) -> None:
    """Point the forwarder to ``port`` at its app's settings (the default app's: no link)."""
    link = link_path(run_dir, port)
    link.unlink(missing_ok=True)
    if app != DEFAULT_APP:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(env_path(run_dir, app))


def app_of(run_dir: Path, port: int) -> str:
    """The app a forwarder to ``port`` carries: its instance's, else the one its link names,
    else (a forwarder of an older version) the default app."""
    env = instances.read_env(run_dir, port) or read_environment_file(link_path(run_dir, port))
    return instances.app_named(env)


async def start(systemd: Systemd, run_dir: Path, port: int, public_port: int,
                kind: Forwarder = Forwarder.SOCAT, timeout: float = 10.0,
                app: str = DEFAULT_APP) -> None:
    """Make the public port reach ``port``; return once new connections get there.

    A running haproxy is switched over its runtime API. A forwarder unit that starts is
    waited for until it listens: forwarders share one (dynamic) user, so the new listener is
    told from the old one by its socket, the one that was not there before the start.
    """
    name = unit(port, kind)
    if kind == Forwarder.HAPROXY:
        haproxy.write_serving(run_dir, port)  # what it serves should it (re)start
        if (await systemd.status(name)).is_running:
            try:
                await _switch_haproxy(systemd, run_dir, port, timeout)
            except (haproxy.HaproxyError, SystemdError) as exc:
                raise ForwarderError(str(exc)) from None
            return
    before = {s.inode for s in sockdiag.listeners(public_port)}
    _link(run_dir, port, app)
    await systemd.reset_failed(name)
    await systemd.start_unit(name)
    deadline = time.monotonic() + timeout
    polls = 0
    while not {s.inode for s in sockdiag.listeners(public_port)} - before:
        polls += 1
        if polls % 20 == 0:
            status = await systemd.status(name)
            if not status.is_running:
                raise ForwarderError(f"{name} {status.describe_failure()} before listening "
                                     f"on port {public_port}")
        if time.monotonic() > deadline:
            raise ForwarderError(f"{name} does not listen on port {public_port} "
                                 f"after {timeout:g} s")
        await asyncio.sleep(0.002)


async def _switch_haproxy(systemd: Systemd, run_dir: Path, port: int, timeout: float) -> None:
    """Switch a running haproxy to ``port``: over its runtime API, or, when its settings are
    no longer the ones written (the public port, say), by a reload. Its new worker then serves
    ``port`` alone (haproxy-serving.cfg) on the new settings, while the old one lets the
    requests it carries finish (drain_stop waits for it) and hands over or closes its
    listener."""
    api = haproxy.RuntimeApi(run_dir)
    info = await api.info()
    wanted = haproxy.written_description(run_dir)
    if info.get("description") == wanted:
        await haproxy.switch(api, port)
        return
    log.info("reloading %s for its new settings", haproxy.UNIT)
    await systemd.reload_unit(haproxy.UNIT)
    await haproxy.reloaded(api, info.get("Pid", ""), wanted, time.monotonic() + timeout)


async def _old_haproxy_workers(systemd: Systemd, api: haproxy.RuntimeApi, deadline: float) -> None:
    """Wait until no worker an earlier reload left runs (or ``deadline``): they still carry
    requests to the instances they served."""
    while time.monotonic() < deadline:
        worker = int((await api.info()).get("Pid", "0") or 0)
        main, pids = await systemd.processes(haproxy.UNIT)
        if not pids - {main, worker}:
            return
        await asyncio.sleep(haproxy.POLL)
    log.warning("%s: a worker of its last reload still runs at the drain timeout", haproxy.UNIT)


async def targets(systemd: Systemd, run_dir: Path, app: str = DEFAULT_APP) -> dict[int, bool]:
    """The instance ports the app's forwarders reach now, each with whether new connections
    get there (not so for a server haproxy drains)."""
    found = {port: True for port in await _running_ports(systemd) if app_of(run_dir, port) == app}
    public_port = written_public_port(run_dir, app)
    if public_port is not None:
        for port, taking in direct.targets(run_dir, public_port).items():
            found[port] = found.get(port, False) or taking
    if app == DEFAULT_APP and (await systemd.status(haproxy.UNIT)).is_running:
        try:
            servers = await haproxy.RuntimeApi(run_dir).servers()
        except haproxy.HaproxyError as exc:
            log.error("%s: its servers are not known", exc)
            servers = {}
        for server in servers.values():
            found[server.port] = found.get(server.port, False) or server.ready
    return found


async def _running_ports(systemd: Systemd) -> list[int]:
    ports = (port_of(status.name) for status in await systemd.list_units(*PATTERNS)
             if status.is_running)
    return [port for port in ports if port is not None]


async def _stop_units(systemd: Systemd, run_dir: Path, port: int) -> None:
    """Stop the forwarder units to ``port``, of every kind (a socat unit's stop drains it)."""
    for kind in _TEMPLATE:
        await systemd.stop_unit(unit(port, kind))
        await systemd.reset_failed(unit(port, kind))
    link_path(run_dir, port).unlink(missing_ok=True)


async def undo_switch(systemd: Systemd, run_dir: Path, kind: Forwarder, new_ports: Sequence[int],
                      served: Sequence[int], timeout: float) -> None:
    """A switch failed part way: forward to the ``served`` ports alone again, as before it.

    The forwarders started for ``new_ports`` stop; haproxy's serving file names what serves
    again, should it restart, and a running haproxy makes the old server ready again and
    retires the new ones, or stops if it served nothing before this switch started it.
    """
    for port in new_ports:
        await _stop_units(systemd, run_dir, port)
    if kind != Forwarder.HAPROXY:
        return
    if served:
        haproxy.write_serving(run_dir, served[0])
    else:
        haproxy.forget_serving(run_dir)
    if not (await systemd.status(haproxy.UNIT)).is_running:
        return
    api = haproxy.RuntimeApi(run_dir)
    try:
        servers = await api.servers()
        if served and haproxy.server_name(served[0]) in servers:
            await haproxy.switch(api, served[0])
            deadline = time.monotonic() + timeout
            for port in new_ports:
                await haproxy.retire(api, port, deadline)
            return
    except haproxy.HaproxyError as exc:
        raise ForwarderError(str(exc)) from None
    await systemd.stop_unit(haproxy.UNIT)  # this switch started it: it carried nothing before
    await systemd.reset_failed(haproxy.UNIT)
    await systemd.stop_unit(haproxy.SOCKET_UNIT)


async def drain_stop(systemd: Systemd, run_dir: Path, port: int, timeout: float) -> None:
    """Stop forwarding to ``port`` (whatever the kind) once the requests it carries are done,
    or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    await _stop_units(systemd, run_dir, port)
    if not (await systemd.status(haproxy.UNIT)).is_running:
        return
    api = haproxy.RuntimeApi(run_dir)
    try:
        servers = await api.servers()
        if haproxy.server_name(port) not in servers:
            await _old_haproxy_workers(systemd, api, deadline)  # a reload took it out
            return
        if any(server.ready for server in servers.values() if server.port != port):
            await haproxy.retire(api, port, deadline)
            return
    except haproxy.HaproxyError as exc:
        raise ForwarderError(str(exc)) from None
    # The public port has moved to another kind of forwarder: haproxy goes, letting the
    # requests in flight finish (its stop signal is a soft stop).
    await systemd.stop_unit(haproxy.UNIT)
    await systemd.reset_failed(haproxy.UNIT)
    await systemd.stop_unit(haproxy.SOCKET_UNIT)


class Forwarders:
    """An app's forwarders, whatever their kind: ``switch_to`` instances, ``drain`` one,
    ``switch_back`` after a failed switch, ``write_env`` their settings. Each is told the
    settings to follow: a deployment's own while it runs (it switches the forwarders to them),
    else those in effect."""

    def __init__(self, systemd: Systemd, run_dir: Path, app: str) -> None:
        self.systemd = systemd
        self.run_dir = run_dir
        self.app = app

    @staticmethod
    def address(config: Config) -> str:
        """The address the forwarders of ``config`` listen on (see listen_address)."""
        return listen_address(config.ports.public_address, ipv6_available(),
                              served_addresses(config.ports.public))

    def canary_blocker(self, config: Config) -> str | None:
        """Why the next switch cannot split the public port between two releases: its
        listeners would not all be in one group (another port or address). None: it can."""
        served = served_addresses(config.ports.public)  # one look, for both questions
        wanted = listen_address(config.ports.public_address, ipv6_available(), served)
        if served and set(served) <= {wanted}:
            return None
        return (f"the public port moves to {wanted}:{config.ports.public} (served on "
                f"{', '.join(served) or 'no address'} of that port now), where the old "
                "release's listeners are not")

    def write_env(self, config: Config) -> str:
        """Write what the app's forwarder units read, from ``config``; return the address they
        will listen on."""
        ports, public_port = config.ports, config.ports.public
        address = self.address(config)
        path = env_path(self.run_dir, self.app)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, environment_file({
            "BLUEGREEN_APP": self.app,
            "BLUEGREEN_PUBLIC_PORT": str(public_port),
            "BLUEGREEN_PUBLIC_ADDRESS": address,
            "BLUEGREEN_SOCAT_LISTEN": socat_listen(address, public_port),
            "BLUEGREEN_MAX_CONNECTIONS": str(ports.max_connections),
            "BLUEGREEN_DRAIN_TIMEOUT": f"{config.drain_timeout:g}",
        }))
        if self.app == DEFAULT_APP:
            haproxy.write_config(self.run_dir, address, public_port, ports.max_connections,
                                 config.drain_timeout)
        return address

    async def prepare_instance(self, port: int, config: Config) -> None:
        """Before the instance on ``port`` starts: with forwarder = "direct" it listens on the
        public port too (not admitted), with the others on its own port alone."""
        if config.forwarder != Forwarder.DIRECT:
            direct.forget(self.systemd, port)
            return
        public_port = config.ports.public
        others = {sock.uid for sock in sockdiag.listeners(public_port)} - {instances.SYSTEMD_UID}
        if others:  # SO_REUSEPORT shares a port between sockets of one user only
            raise ForwarderError(
                f"port {public_port} is held by another kind of forwarder (user {min(others)}): "
                "the instances cannot listen there beside it. Changing to forwarder = "
                "\"direct\" needs the port free: stop bluegreen and its forwarder units, then "
                "start bluegreen again (a short outage)")
        address = listen_address(config.ports.public_address, ipv6_available(),
                                 served_addresses(public_port))
        await direct.prepare(self.systemd, port, address, public_port)

    async def switch_to(self, ports: Iterable[int], config: Config,
                        shares: dict[int, int] | None = None) -> None:
        """Make the public port reach each of ``ports`` too; return once it does (see start).
        Its instances are weighed by ``shares`` (a canary's), else equally."""
        # First: a forwarder's start hook sets the program with them.
        direct.records(self.run_dir).share(config.ports.public, shares or {})
        if config.forwarder == Forwarder.DIRECT:
            ports = list(ports)
            for port in ports:
                _link(self.run_dir, port, self.app)  # the drain unit reads the app's settings
            direct.admit(self.run_dir, config.ports.public, add=ports)
            await direct.steer(self.systemd, config.ports.public)
            taking = direct.targets(self.run_dir, config.ports.public)
            unknown = [port for port in ports if not taking.get(port)]
            if unknown:  # its start hook did not record it: the program cannot name it
                raise ForwarderError(
                    f"the listener of the instance on port {unknown[0]} on port "
                    f"{config.ports.public} is not in the port's steering record (see the "
                    f"journal of {instances.unit(unknown[0])})")
            return
        for port in ports:
            await start(self.systemd, self.run_dir, port, config.ports.public, config.forwarder,
                        app=self.app)

    async def start_canary(self, new_ports: Sequence[int], shares: dict[int, int],
                           config: Config) -> None:
        """Make the public port reach ``new_ports`` too, each instance (old and new) weighed
        by ``shares``: the new release takes its canary's share of new connections."""
        if config.forwarder == Forwarder.HAPROXY:
            await self._haproxy_canary(new_ports, shares, config)
            return
        await self.switch_to(new_ports, config, shares)

    async def _haproxy_canary(self, new_ports: Sequence[int], shares: dict[int, int],
                              config: Config) -> None:
        """haproxy's servers weighed by ``shares``, the new one ready. A haproxy whose settings
        are no longer the ones written reloads first, serving what it serves now."""
        if not (await self.systemd.status(haproxy.UNIT)).is_running:
            raise ForwarderError(f"{haproxy.UNIT} is not running: no release to compare with")
        api = haproxy.RuntimeApi(self.run_dir)
        try:
            info = await api.info()
            wanted = haproxy.written_description(self.run_dir)
            if info.get("description") != wanted:
                log.info("reloading %s for its new settings", haproxy.UNIT)
                await self.systemd.reload_unit(haproxy.UNIT)
                await haproxy.reloaded(api, info.get("Pid", ""), wanted,
                                       time.monotonic() + config.drain_timeout + 10)
            for port in new_ports:
                await haproxy.canary(api, port, shares)
        except (haproxy.HaproxyError, SystemdError) as exc:
            raise ForwarderError(str(exc)) from None

    async def end_canary(self, keep: Sequence[int], config: Config) -> None:
        """A canary is over: new connections go to the ``keep`` instances (the new release's
        after a promotion, the old one's after an abort, whose instances have their drain
        flag up), weighed equally again."""
        public_port = config.ports.public
        if config.forwarder == Forwarder.HAPROXY:  # the others drain, then go (drain_stop)
            haproxy.write_serving(self.run_dir, keep[0])
            try:
                await haproxy.switch(haproxy.RuntimeApi(self.run_dir), keep[0])
            except haproxy.HaproxyError as exc:
                raise ForwarderError(str(exc)) from None
            return
        direct.records(self.run_dir).share(public_port, {})
        if config.forwarder == Forwarder.DIRECT:
            direct.admit(self.run_dir, public_port, only=keep)
        await direct.steer(self.systemd, public_port)

    async def drain(self, port: int, config: Config) -> None:
        """Stop forwarding to ``port`` once the requests it carries are done, or at
        drain_timeout (see drain_stop)."""
        if config.forwarder == Forwarder.DIRECT:
            direct.admit(self.run_dir, config.ports.public, remove=[port])
            await direct.steer(self.systemd, config.ports.public)
            await direct.drain(self.systemd, port, config.drain_timeout)
        await drain_stop(self.systemd, self.run_dir, port, config.drain_timeout)

    async def switch_back(self, new_ports: Sequence[int], served: Sequence[int],
                          config: Config) -> None:
        """A switch to ``new_ports`` failed part way: forward to the ``served`` ports alone
        again (see undo_switch)."""
        direct.records(self.run_dir).share(config.ports.public, {})  # a canary's weights
        if config.forwarder == Forwarder.DIRECT:
            direct.admit(self.run_dir, config.ports.public, only=served)
            await direct.steer(self.systemd, config.ports.public)
        await undo_switch(self.systemd, self.run_dir, config.forwarder, new_ports, served,
                          config.drain_timeout)
