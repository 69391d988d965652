"""The HAProxy forwarder (forwarder = "haproxy"): one bluegreen-haproxy.service, Debian's haproxy.
This module runs in the controller; no code of bluegreen runs in haproxy's unit.

It speaks HTTP (``mode http``): every request is routed on its own, so a switch moves a
keep-alive client at its next request without closing its connection; it sets
X-Forwarded-For and X-Forwarded-Proto, replacing what the client sent; it reads a request's
headers before any instance sees them, so a slow client holds none of the app's workers.

Its configuration is two files under the runtime directory: ``haproxy.cfg`` (the public port,
written with the other forwarders' settings) and ``haproxy-serving.cfg`` (the backend, naming
the instance the public port reaches, so that a restarted haproxy serves it at once).
Switches go through its runtime API, with no reload: ``add server`` for the new instance,
``set server ... state ready``, the others to ``drain``; once a drained server carries no
request, ``maint`` and ``del server``. A canary makes the new server ready beside the old one,
each with a weight (``set server ... weight``): the backend balances round-robin by weight,
request by request, so a keep-alive client's requests are split too. The API's socket is
bluegreen-haproxy.socket's, root's alone; haproxy gets it as descriptor 3.

Settings haproxy.cfg holds (the public port and address, maxconn, the drain timeout) change
with a reload, at the next switch: the new worker serves the new instance alone, the old
worker finishes its requests and exits (forwarders/control.py waits for it before the old instance
stops). ``description`` in haproxy.cfg, a digest of the rest, tells whether the running
haproxy has the settings written.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bluegreen.files import atomic_write

log = logging.getLogger(__name__)

UNIT = "bluegreen-haproxy.service"
SOCKET_UNIT = "bluegreen-haproxy.socket"
SOCKET = "haproxy.sock"
CONFIG = "haproxy.cfg"
SERVING = "haproxy-serving.cfg"
BACKEND = "app"
POLL = 0.05
DESCRIPTION = "bluegreen-settings-"


class HaproxyError(Exception):
    pass


def server_name(port: int) -> str:
    return f"p{port}"


def port_of_server(name: str) -> int | None:
    return int(name[1:]) if name[:1] == "p" and name[1:].isdigit() else None


def bind_line(address: str, port: int) -> str:
    """haproxy's bind for forwarder.listen_address(): "::" is both stacks, as with socat."""
    if address == "::":
        return f"bind :::{port} v4v6"
    if ":" in address:
        return f"bind {address}:{port} v6only"
    return f"bind {address}:{port}"


def config(address: str, public_port: int, max_connections: int, drain_timeout: float) -> str:
    """The global, defaults and frontend sections (the backend is in haproxy-serving.cfg).

    Its ``description`` is a digest of the rest: ``show info`` tells which settings the
    running haproxy has, and a switch reloads it when they are not the ones written."""
    settings = _settings(address, public_port, max_connections, drain_timeout)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return settings.replace("global\n", f"global\n    description {DESCRIPTION}{digest}\n", 1)


def _settings(address: str, public_port: int, max_connections: int, drain_timeout: float) -> str:
    return f"""\
# Written by bluegreen for bluegreen-haproxy.service: changes are overwritten.
global
    # The runtime API: bluegreen-haproxy.socket, that only root may connect to.
    stats socket fd@3 level admin
    maxconn {max_connections}
    # A stop (SIGUSR1) lets the requests in flight finish, as a drain does, this long at most.
    hard-stop-after {max(drain_timeout, 1):g}s
    log stderr format short local0 notice

defaults
    mode http
    log global
    option dontlognull
    timeout connect 5s
    # A client has this long to send a request's headers (slowloris gets no worker).
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout client 1m
    timeout server 10m
    timeout queue 1m
    timeout tunnel 1h

frontend public
    {bind_line(address, public_port)}
    maxconn {max_connections}
    # The client is who connected here, whatever it says; an IPv4 client on the listener of
    # both stacks as itself (not ::ffff:a.b.c.d).
    http-request set-src src,ipmask(32,128)
    http-request del-header X-Forwarded-For
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    default_backend {BACKEND}
"""


def serving_config(port: int) -> str:
    return f"""\
# Written by bluegreen: the instance the public port reaches when haproxy starts.
backend {BACKEND}
    # Requests go round-robin to the ready servers by weight: after a switch (the new one ready,
    # then the old one draining) to the new one alone; during a canary, by its share.
    balance roundrobin
    server {server_name(port)} 127.0.0.1:{port}
"""


def write_config(run_dir: Path, address: str, public_port: int, max_connections: int,
                 drain_timeout: float) -> None:
    atomic_write(run_dir / CONFIG, config(address, public_port, max_connections, drain_timeout))


def write_serving(run_dir: Path, port: int) -> None:
    atomic_write(run_dir / SERVING, serving_config(port))


def forget_serving(run_dir: Path) -> None:
    (run_dir / SERVING).unlink(missing_ok=True)


def written_description(run_dir: Path) -> str:
    """The description of the settings written for haproxy ("" if none are)."""
    try:
        text = (run_dir / CONFIG).read_text()
    except FileNotFoundError:
        return ""
    for line in text.splitlines():
        if line.strip().startswith("description "):
            return line.split(None, 1)[1].strip()
    return ""


def parse_info(text: str) -> dict[str, str]:
    """``show info``: a "Name: value" line each."""
    return {name.strip(): value.strip() for name, sep, value in
            (line.partition(":") for line in text.splitlines()) if sep}


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    admin_state: int  # haproxy's SRV_ADMF_* bits: 0x01 forced maintenance, 0x08 forced drain

    @property
    def ready(self) -> bool:
        return self.admin_state == 0  # neither in maintenance nor draining, of any cause


def parse_servers_state(text: str) -> dict[str, Server]:
    """The servers of ``show servers state BACKEND``: its first line is a version, its second
    the field names."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if line.startswith("#")), None)
    if header is None:
        return {}
    names = header.lstrip("# ").split()
    servers = {}
    for line in lines[lines.index(header) + 1:]:
        row = dict(zip(names, line.split(), strict=False))
        if row.get("be_name") != BACKEND:
            continue
        port = port_of_server(row["srv_name"])
        if port is not None:
            servers[row["srv_name"]] = Server(row["srv_name"], port, int(row["srv_admin_state"]))
    return servers


def parse_sessions(text: str, name: str) -> int:
    """Requests ``name`` serves or has queued, from ``show stat`` (CSV): scur + qcur."""
    reader = csv.DictReader(text.lstrip("# ").splitlines())
    for row in reader:
        if row.get("pxname") == BACKEND and row.get("svname") == name:
            return int(row.get("scur") or 0) + int(row.get("qcur") or 0)
    return 0


class RuntimeApi:
    """haproxy's runtime API, one command per connection (its non-interactive mode)."""

    def __init__(self, run_dir: Path, timeout: float = 5.0) -> None:
        self.path = run_dir / SOCKET
        self.timeout = timeout

    async def command(self, line: str) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    answer = await reader.read()
                finally:
                    writer.close()
                    await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise HaproxyError(f"haproxy's runtime API ({self.path}) did not answer "
                               f"{line.split()[0]!r}: {exc or 'timeout'}") from None
        return answer.decode(errors="replace").strip()

    async def expect(self, line: str, *accepted: str) -> str:
        """Run ``line``; its answer must be one of ``accepted`` ("" for silence)."""
        answer = await self.command(line)
        if answer not in (accepted or ("",)):
            raise HaproxyError(f"haproxy refused {line!r}: {answer}")
        return answer

    async def info(self) -> dict[str, str]:
        return parse_info(await self.command("show info"))

    async def servers(self) -> dict[str, Server]:
        return parse_servers_state(await self.command(f"show servers state {BACKEND}"))

    async def sessions(self, name: str) -> int:
        return parse_sessions(await self.command("show stat"), name)

    async def add(self, port: int) -> None:
        await self.expect(f"add server {BACKEND}/{server_name(port)} 127.0.0.1:{port}",
                          "New server registered.")

    async def set_state(self, name: str, state: str) -> None:
        await self.expect(f"set server {BACKEND}/{name} state {state}")

    async def delete(self, name: str) -> str:
        """Remove ``name``; return haproxy's refusal ("" once deleted)."""
        answer = await self.command(f"del server {BACKEND}/{name}")
        return "" if answer == "Server deleted." else answer


async def switch(api: RuntimeApi, port: int) -> None:
    """Make the instance on ``port`` the one that gets every new request; drain the others."""
    servers = await api.servers()
    name = server_name(port)
    if name not in servers:
        await api.add(port)  # added in maintenance
    # One line, run by haproxy in one go: no request between the two goes round-robin to both.
    changes = [f"set server {BACKEND}/{name} state ready"]
    changes += [f"set server {BACKEND}/{other.name} state drain" for other in servers.values()
                if other.name != name and other.ready]
    await api.expect("; ".join(changes))


def weight(share: int, scale: int = 1000) -> int:
    """haproxy's weight (1 to 256) for a share of ``scale``."""
    return max(1, min(256, round(share * 256 / scale)))


async def canary(api: RuntimeApi, port: int, shares: dict[int, int]) -> None:
    """Make the instance on ``port`` ready beside the serving one, each server weighed by its
    share in ``shares`` (of canary.SCALE)."""
    servers = await api.servers()
    name = server_name(port)
    if name not in servers:
        await api.add(port)  # added in maintenance
    for target, share in shares.items():
        if server_name(target) in servers or target == port:
            await api.expect(f"set server {BACKEND}/{server_name(target)} weight {weight(share)}")
    await api.set_state(name, "ready")


async def reloaded(api: RuntimeApi, old_worker: str, description: str, deadline: float) -> None:
    """Wait until a new worker, with the settings of ``description``, answers the runtime API
    (the old worker closes its end of the socket as it begins to stop)."""
    while True:
        try:
            info = await api.info()
        except HaproxyError:
            info = {}
        if info.get("Pid", old_worker) != old_worker and info.get("description") == description:
            return
        if time.monotonic() >= deadline:
            raise HaproxyError(f"haproxy did not reload: its worker {info.get('Pid', '?')} has "
                               f"settings {info.get('description', '?')!r}, not {description!r}")
        await asyncio.sleep(POLL)


async def retire(api: RuntimeApi, port: int, deadline: float) -> bool:
    """Drain the server of ``port``, wait until it carries no request (or ``deadline``), then
    delete it. False if haproxy has no such server."""
    name = server_name(port)
    if name not in await api.servers():
        return False
    await api.set_state(name, "drain")
    while await api.sessions(name) and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
    await api.set_state(name, "maint")
    # Refused while a connection to it is still attached (an idle one is being closed).
    for last_try in (False, True):
        while refusal := await api.delete(name):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        else:
            return True
        if last_try:
            raise HaproxyError(f"haproxy keeps server {name}: {refusal}")
        log.warning("cutting what haproxy still sends to port %d: %s", port, refusal)
        await api.command(f"shutdown sessions server {BACKEND}/{name}")
        deadline = time.monotonic() + 2.0
    raise AssertionError("unreachable")
