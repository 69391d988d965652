"""The front: one Caddy (Debian's) for the host, bluegreen-front.service, on ports 80 and 443.

It serves each app's ``domains`` over HTTPS with certificates it gets and renews itself from
the ACME CA of ``[front]``, redirects http to https, and passes each request on to the public
port of the app whose domain it names. bluegreen switches that port as it always does, so the
front's configuration never changes during a deploy.

Which domain belongs to which app is not in Caddy's configuration but in files the front
looks for on each request, ``/run/bluegreen/front/sites/APP/DOMAIN`` (and ``names/DOMAIN``
for its certificate): adding or removing a domain at ``systemctl reload bluegreen`` writes or
removes files and reloads nothing. Caddy gets a domain's certificate at the first handshake
that names it (on demand), once its ``ask`` endpoint, the front's own port 80 on loopback,
finds the domain's file: no name that no app claims gets a certificate. bluegreen makes that
first handshake itself right after the reload, so that the certificate is there before a
client asks.

The configuration itself changes, and the front is reloaded, only when an app comes or goes,
a public port moves, or ``[front]`` changes. A Caddy reload runs the new configuration beside
the old one on the same listeners: no connection is refused and requests in flight finish,
but it closes upgraded connections (websockets) and HTTP/3 (which is therefore off), and an
idle keep-alive connection may be closed just as its client sends a request on it.

The front sets X-Forwarded-For, -Proto and -Host itself, replacing whatever the client sent;
an app with domains gets its public port on 127.0.0.1 and believes those headers from there
(config.py), so that only the front, not a client, can speak for the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pwd
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bluegreen import maintenance, sockdiag
from bluegreen.config import LETSENCRYPT, Config, FrontConfig
from bluegreen.files import atomic_write
from bluegreen.history import Deployment, Step
from bluegreen.systemd import ActiveState, Systemd, SystemdError

log = logging.getLogger(__name__)

UNIT = "bluegreen-front.service"
# Under bluegreen's runtime directory; the unit reads it at start and at reload.
CONFIG_NAME = "front.json"
# The admin endpoint, which takes a whole new configuration: a unix socket of the front's own
# runtime directory (mode 0700 under its user), never TCP, where any local process could reach it.
ADMIN = "unix//run/bluegreen-front/admin.sock"
# The certificates, keys and ACME account (StateDirectory= of the unit).
STORAGE = "/var/lib/bluegreen-front"
# Headers a client may send to claim another scheme or address: the front removes them and
# sets its own X-Forwarded-* (gunicorn believes X-Forwarded-Ssl and -Protocol too).
SPOOFABLE = ("Forwarded", "X-Forwarded-Ssl", "X-Forwarded-Protocol", "X-Real-Ip")
PORTS = (80, 443)


@dataclass(frozen=True)
class Site:
    """The domains of one app and the public port that serves it; ``next_port``, one a reload
    has set that its next deploy moves to (None when there is none)."""

    app: str
    domains: tuple[str, ...]
    port: int
    next_port: int | None = None
    maintenance_page: Path | None = None  # while this file exists, the front answers with it

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,) if self.next_port in (None, self.port) else (self.port, self.next_port)


def sites(configs: Iterable[tuple[Config, Config]]) -> list[Site]:
    """The site of every app whose settings (in effect, in the file) these are, with domains
    or not: an app's route is in the configuration before it has a domain, so that its first
    domain is a file, not a reload."""
    return [Site(in_effect.app_name, in_effect.app.domains, in_effect.ports.public,
                 in_file.ports.public, maintenance.page(in_effect.app_name))
            for in_effect, in_file in configs]


def sites_directory(run_dir: Path) -> Path:
    """sites/APP/DOMAIN: the domains the front passes on to each app."""
    return run_dir / "front" / "sites"


def names_directory(run_dir: Path) -> Path:
    """names/DOMAIN: every domain the front may get a certificate for."""
    return run_dir / "front" / "names"


def _load_balancing(site: Site) -> dict[str, Any]:
    # A connection the public port refuses is tried again rather than answered with a 502.
    balancing: dict[str, Any] = {"try_duration": "5s", "try_interval": "100ms"}
    if len(site.ports) > 1:
        # The deploy that moves the app to its next public port switches to it, then closes
        # the old one: the old port first while it answers; once it refuses, the next (a
        # refused dial marks it down for a while), until the deploy's end rewrites the front.
        balancing["selection_policy"] = {"policy": "first"}
    return balancing


# The error that turns a request into the maintenance page (the server's error routes).
_MAINTENANCE = "maintenance"
# Conditions and ranges would turn the page into a 304 or a part of it.
_CONDITIONS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "Range",
               "If-Range")


def _maintenance_check(site: Site) -> list[dict[str, Any]]:
    """The route that, while the site's page exists, ends the request with the maintenance
    error: checked on each request, so that turning maintenance on or off is no reload."""
    if site.maintenance_page is None:
        return []
    return [{
        "match": [{"file": {"root": str(site.maintenance_page.parent),
                            "try_files": [f"/{site.maintenance_page.name}"]}}],
        "handle": [{"handler": "error", "status_code": 503, "error": _MAINTENANCE}],
    }]


def _maintenance_page(site: Site, run_dir: Path) -> dict[str, Any]:
    """The error route that answers the maintenance error with the site's page, whatever the
    method asked, never cached, with Retry-After."""
    assert site.maintenance_page is not None
    return {
        "match": [_named(sites_directory(run_dir) / site.app, "http.request.host")],
        "handle": [{"handler": "subroute", "routes": [{
            "match": [{"expression": f'{{http.error.message}} == "{_MAINTENANCE}"'}],
            "handle": [
                {"handler": "headers",
                 "request": {"delete": list(_CONDITIONS)},
                 "response": {"set": {"Retry-After": [str(maintenance.RETRY_AFTER)],
                                      "Cache-Control": ["no-store"]},
                              "delete": ["Etag", "Last-Modified", "Accept-Ranges"],
                              "deferred": True}},
                {"handler": "rewrite", "uri": f"/{site.maintenance_page.name}"},
                {"handler": "subroute", "routes": [{
                    "match": [{"not": [{"method": ["GET", "HEAD"]}]}],
                    "handle": [{"handler": "rewrite", "method": "GET"}],
                }]},
                {"handler": "file_server", "root": str(site.maintenance_page.parent)},
            ],
        }]}],
        "terminal": True,
    }


# Where Caddy asks whether a name may get a certificate: the front's own port 80, from
# loopback only (it says no more than which domains are served).
ASK_PATH = "/.well-known/bluegreen/ask"
ASK = f"http://127.0.0.1:80{ASK_PATH}"
_LOOPBACK = {"ranges": ["127.0.0.0/8", "::1/128"]}


def _named(directory: Path, placeholder: str) -> dict[str, Any]:
    """A matcher: the file named by the request's ``placeholder`` exists in ``directory``
    (Caddy cleans the name: it cannot lead out of the directory)."""
    return {"file": {"root": str(directory), "try_files": [f"/{{{placeholder}}}"]}}


def _not_served() -> dict[str, Any]:
    return {"handle": [{"handler": "static_response", "status_code": 404,
                        "body": "No site is served under this name.\n"}]}


def _plain(run_dir: Path) -> dict[str, Any]:
    """Port 80: the ask endpoint, then http to https for every served name (ACME's HTTP-01
    challenges are answered before any route, by Caddy itself)."""
    names = names_directory(run_dir)
    return {
        "listen": [":80"],
        "routes": [
            {"match": [{"path": [ASK_PATH], "remote_ip": _LOOPBACK}],
             "handle": [{"handler": "subroute", "routes": [
                 {"match": [_named(names, "http.request.uri.query.domain")],
                  "handle": [{"handler": "static_response", "status_code": 200}]},
                 {"handle": [{"handler": "static_response", "status_code": 404}]}]}],
             "terminal": True},
            {"match": [_named(names, "http.request.host")],
             "handle": [{"handler": "static_response", "status_code": 308, "headers": {
                 "Location": ["https://{http.request.host}{http.request.uri}"]}}],
             "terminal": True},
            _not_served(),
        ],
    }


def render(served: Iterable[Site], front: FrontConfig, run_dir: Path) -> str:
    """Caddy's JSON configuration for these sites (their domains are files: publish)."""
    served = list(served)
    routes = [{
        "match": [_named(sites_directory(run_dir) / site.app, "http.request.host")],
        "handle": [{"handler": "subroute", "routes": [*_maintenance_check(site), {"handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": f"127.0.0.1:{port}"} for port in site.ports],
            "load_balancing": _load_balancing(site),
            **({"health_checks": {"passive": {"fail_duration": "2s", "max_fails": 1}}}
               if len(site.ports) > 1 else {}),
            "headers": {"request": {
                "set": {
                    "X-Forwarded-For": ["{http.request.remote.host}"],
                    "X-Forwarded-Proto": ["{http.request.scheme}"],
                    "X-Forwarded-Host": ["{http.request.host}"],
                },
                "delete": list(SPOOFABLE),
            }},
        }]}]}],
        "terminal": True,
    } for site in served] + [_not_served()]
    errors = [_maintenance_page(site, run_dir) for site in served
              if site.maintenance_page is not None]
    issuer: dict[str, Any] = {"module": "acme", "ca": front.acme_ca or LETSENCRYPT}
    if front.email:
        issuer["email"] = front.email
    if front.acme_ca_root:
        issuer["trusted_roots_pem_files"] = [front.acme_ca_root]
    document = {
        "admin": {"listen": ADMIN, "config": {"persist": False}},
        "storage": {"module": "file_system", "root": STORAGE},
        "apps": {
            "http": {
                "http_port": 80,
                "https_port": 443,
                "servers": {
                    "front": {
                        "listen": [":443"],
                        "protocols": ["h1", "h2"],  # no HTTP/3: a reload closes it without grace
                        "routes": routes,
                        **({"errors": {"routes": errors}} if errors else {}),
                    },
                    "plain": _plain(run_dir),
                },
            },
            "tls": {"automation": {
                "policies": [{"issuers": [issuer], "on_demand": True}],
                "on_demand": {"ask": ASK},
            }},
        },
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def publish(run_dir: Path, served: Iterable[Site]) -> tuple[list[str], list[str]]:
    """Make the domain files say what the sites say: the domains added and removed. A new
    domain's files appear site first, then name (its certificate); a removed one's go in the
    other order."""
    sites, names = sites_directory(run_dir), names_directory(run_dir)
    wanted = {site.app: set(site.domains) for site in served}
    present = {entry.name: {f.name for f in entry.iterdir()}
               for entry in sites.glob("*") if entry.is_dir()} if sites.is_dir() else {}
    added, removed = [], []
    for directory in (sites, names):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    for app, domains in wanted.items():
        (sites / app).mkdir(mode=0o755, exist_ok=True)
        for domain in sorted(domains - present.get(app, set())):
            (sites / app / domain).touch(mode=0o644)
            (names / domain).touch(mode=0o644)
            added.append(domain)
    claimed = set().union(*wanted.values()) if wanted else set()
    for app, domains in present.items():
        for domain in sorted(domains - wanted.get(app, set())):
            if domain not in claimed:
                (names / domain).unlink(missing_ok=True)
                removed.append(domain)
            (sites / app / domain).unlink(missing_ok=True)
        if app not in wanted:
            (sites / app).rmdir()
    for stale in names.iterdir():
        if stale.name not in claimed:
            stale.unlink()
    return added, removed


async def apply(systemd: Systemd, run_dir: Path, served: list[Site], front: FrontConfig) -> str:
    """Bring the front in line with the sites: start it, reload it when its configuration
    changed, stop it when no app has a domain; domains that come and go need no reload.
    Returns what it did; a front that refuses the new configuration keeps the old one (and
    the file says the old one again)."""
    path = run_dir / CONFIG_NAME
    try:
        status = await systemd.status(UNIT)
    except SystemdError as exc:
        log.error("the front (%s) cannot be read: %s", UNIT, exc)
        return "unknown"
    # Serving its configuration: not a front that failed, nor one systemd restarts after a
    # failure (activating), which is started again rather than reloaded.
    running = status.active_state in (ActiveState.ACTIVE, ActiveState.RELOADING)
    if not any(site.domains for site in served):
        publish(run_dir, [])
        if not status.is_running:
            return "none"
        log.info("no app has domains any more: stopping the front (%s)", UNIT)
        await _quietly(systemd.stop_unit(UNIT), "stop")
        path.unlink(missing_ok=True)
        return "stopped"
    text = render(served, front, run_dir)
    try:
        old: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    added, removed = publish(run_dir, served)
    domains = ", ".join(f"{site.app}: {' '.join(site.domains)} -> "
                        + " then ".join(f":{port}" for port in site.ports)
                        for site in served if site.domains)
    if text == old and running:
        if not (added or removed):
            return "unchanged"
        log.info("the front serves %s (domains %s; no reload)", domains, _changes(added, removed))
        return "domains"
    atomic_write(path, text)
    if running:
        if await _quietly(systemd.reload_unit(UNIT), "reload"):
            log.info("the front serves %s (reloaded)", domains)
            return "reloaded"
        if old is not None:
            atomic_write(path, old)
        return "failed"
    await systemd.reset_failed(UNIT)  # a front that failed before may have hit its start limit
    if await _quietly(systemd.start_unit(UNIT), "start"):
        log.info("the front serves %s (started)", domains)
        return "started"
    held = holders()
    if held:
        log.error("the front cannot listen: %s", held)
    return "failed"


def _changes(added: list[str], removed: list[str]) -> str:
    return "; ".join(part for part in (f"added {' '.join(added)}" if added else "",
                                       f"removed {' '.join(removed)}" if removed else "") if part)


def holders(listening: Callable[[int], list[sockdiag.TcpSocket]] = sockdiag.listeners) -> str:
    """Who else listens on the front's ports ("" if nobody): the port, the address and the
    user, which is what the kernel tells a process without the right to look into others."""
    held = []
    for port in PORTS:
        for sock in listening(port):
            try:
                user = pwd.getpwuid(sock.uid).pw_name
            except KeyError:
                user = "?"
            held.append(f"port {port} on {sock.local_address} is held by a process of user "
                        f"{user} (uid {sock.uid})")
    return "; ".join(held)


async def _quietly(job: Any, verb: str) -> bool:
    """Run a job of the front's unit; a failure is logged (the apps stay served on their
    public ports), with where to look for the front's own reason."""
    try:
        await job
    except SystemdError as exc:
        log.error("the %s of the front failed: %s (journalctl -u %s says why)", verb, exc, UNIT)
        return False
    return True


class AfterDeploy:
    """An observer of an app's controller: after each of its deployments the front follows
    the public port the app serves then (a changed ports.public applies at a deploy). The same
    port again changes nothing, so the front's configuration stays still across deploys."""

    def __init__(self, follow: Callable[[], Awaitable[None]]) -> None:
        self.follow = follow
        self.tasks: set[asyncio.Task[None]] = set()

    def step(self, deployment: Deployment, step: Step, port: int) -> None:
        pass

    def changed(self) -> None:
        pass

    def finished(self, deployment: Deployment) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(), name="front")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _follow(self) -> None:
        await self.follow()
