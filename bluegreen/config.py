"""The configuration: /etc/bluegreen/bluegreen.toml, overridden by a few environment variables.

Every key, its type, default and meaning lives in ``KEYS`` below; the shipped
``bluegreen.toml`` and the manual document the same table.  Loading is strict: an unknown key or
a bad value raises :class:`ConfigError` naming the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/bluegreen/bluegreen.toml")
# The app of bluegreen.toml; every other app is a file of /etc/bluegreen/apps (apps.py).
DEFAULT_APP = "default"
# The app's own data, kept across releases (StateDirectory=bluegreen/data of its units).
DATA_DIR = Path("/var/lib/bluegreen/data")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, key and reason."""


class Network(StrEnum):
    """What the app's processes may reach (see the app unit's IPAddressDeny=)."""

    ANY = "any"
    LOOPBACK = "loopback"


class Applies(StrEnum):
    """When a changed setting takes effect, once ``systemctl reload bluegreen`` has read it."""

    NOW = "at once"
    # How the serving release runs: it keeps the value it was deployed with.
    NEXT_DEPLOY = "at the next deploy"
    # The socket is systemd's: bluegreen-generator rewrites it at daemon-reload.
    API_SOCKET = "after systemctl daemon-reload && systemctl restart bluegreen-api.socket"


class Forwarder(StrEnum):
    """What carries the public port to the serving instance (see forwarders/control.py)."""

    SOCAT = "socat"
    PROXY = "proxy"
    HAPROXY = "haproxy"
    DIRECT = "direct"


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")


@dataclass(frozen=True)
class RepositoryConfig:
    url: str = ""
    branch: str = "main"
    poll_interval: float = 10.0
    watch: bool = True
    ssh_known_hosts: str = ""


@dataclass(frozen=True)
class ReleaseConfig:
    build_command: str = ""
    check_command: str = ""
    migrate_command: str = ""
    timeout: float = 600.0
    # Django's collectstatic at build (release/build.py); secrets a build may see, by name.
    collectstatic: bool = True
    build_secrets: tuple[str, ...] = ()
    keep: int = 5


DEFAULT_WSGI = "app:app"
WSGI_APP = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.()]*")
WSGI_MODULE = re.compile(r"[A-Za-z_][\w.]*")  # gunicorn's MODULE alone: MODULE:application


@dataclass(frozen=True)
class AppConfig:
    wsgi: str = ""  # "": the Procfile's web line's, else DEFAULT_WSGI (deploy.py)
    asgi: str = ""  # an ASGI app instead (uvicorn's gunicorn worker); never with wsgi
    health_path: str = ""  # "": /health, else "/" for an app without it (health.py)
    workers: int = 2
    instances: int = 1
    worker_class: str = "sync"
    team: str = ""
    health_host: str = ""  # "": the first of domains, else localhost (health.py)
    network: Network = Network.ANY
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    forwarded_allow_ips: str = ""
    # Served over HTTPS by the front (front.py); lower case, each app's own.
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortsConfig:
    public: int = 5000
    range: PortRange = PortRange(8000, 8999)
    public_address: str = ""  # "": both stacks, or the IPv4 address already served (forwarders/control.py)
    max_connections: int = 1024


@dataclass(frozen=True)
class ApiConfig:
    listen: ListenAddress = ListenAddress("127.0.0.1", 5001)


@dataclass(frozen=True)
class HealthConfig:
    interval: float = 1.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    deadline: float = 60.0


# Let's Encrypt's production directory: the ACME CA of the front unless [front] names another.
LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True)
class FrontConfig:
    """The host's HTTPS front (front.py): set in bluegreen.toml only, for every app."""

    email: str = ""
    acme_ca: str = ""  # "": LETSENCRYPT
    acme_ca_root: str = ""  # a PEM file of the roots a private ACME server's TLS chains to


@dataclass(frozen=True)
class CanaryConfig:
    """A deploy's canary (canary.py): the new release gets ``share`` of new connections for
    ``duration`` seconds, then is promoted, or aborted when its error rate exceeds the old
    release's by more than ``max_error_rate``. A share of 0: no canary."""

    share: float = 0.0
    duration: float = 60.0
    max_error_rate: float = 0.05
    min_requests: int = 100


@dataclass(frozen=True)
class Config:
    repository: RepositoryConfig = RepositoryConfig()
    app: AppConfig = AppConfig()
    ports: PortsConfig = PortsConfig()
    api: ApiConfig = ApiConfig()
    health: HealthConfig = HealthConfig()
    release: ReleaseConfig = ReleaseConfig()
    front: FrontConfig = FrontConfig()
    canary: CanaryConfig = CanaryConfig()
    forwarder: Forwarder = Forwarder.SOCAT
    drain_timeout: float = 30.0
    post_switch_watch: float = 10.0
    history_limit: int = 1000
    processes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: str = "built-in defaults"
    # Which app these settings are (apps.py): the file's name, DEFAULT_APP for bluegreen.toml.
    app_name: str = DEFAULT_APP

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return load_mapping(json.loads(text), source="JSON")


# --- value parsers: each takes the raw TOML value and returns the typed value or raises ValueError


def _number(minimum: float, maximum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number of seconds, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum:g} and {maximum:g}, got {value}")
        return float(value)

    return parse


def parse_share(value: Any) -> float:
    """A share of traffic: a number from 0 to 1, or a percentage ("25%", also on the command
    line)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage") from None
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a share (0.25 or \"25%\")") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError("must be a share from 0 to 1, or a percentage (\"25%\")")
    if not 0 <= number < 1 or number != number:
        raise ValueError(f"{value!r}: a canary's share is from 0 (none) to below 1 (100 % is "
                         "a plain deploy)")
    return number


def share_text(share: float) -> str:
    """A share as the operator writes it (parse_share's inverse): 0.25 -> "25%", 0.125 ->
    "12.5%"."""
    return f"{round(share * 100, 3):g}%"


def _integer(minimum: int, maximum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


def _string(pattern: str, what: str, empty_ok: bool = False) -> Callable[[Any], str]:
    compiled = re.compile(pattern)

    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        if value == "" and empty_ok:
            return value
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return parse


def _choice(kind: type[StrEnum]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        names = [member.value for member in kind]
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"{value!r} is not one of {', '.join(repr(n) for n in names)}")
        return kind(value)

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {type(value).__name__}")
    return value


def _command(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a shell command as a string, got {type(value).__name__}")
    if "\0" in value:
        raise ValueError("a command cannot contain NUL")
    return value


def _wsgi_app(value: Any) -> str:
    """MODULE:CALLABLE, or gunicorn's bare MODULE (Django's documented "mysite.wsgi"), which
    means MODULE:application."""
    if isinstance(value, str) and WSGI_MODULE.fullmatch(value):
        return f"{value}:application"
    return _string(WSGI_APP.pattern, "MODULE:CALLABLE or MODULE", empty_ok=True)(value)


def _secret_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list like [\"DJANGO_SECRET_KEY\"], got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not the name of a secret (a variable name: letters, "
                             "digits, '_')")
    return tuple(dict.fromkeys(value))


def _known_hosts(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected known_hosts lines as a string, got {type(value).__name__}")
    for number, line in enumerate(value.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#") and len(line.split()) < 3:
            raise ValueError(f"line {number} is not a known_hosts line (HOST KEYTYPE KEY), "
                             "as ssh-keyscan prints them")
    if "\0" in value:
        raise ValueError("known_hosts lines cannot contain NUL")
    return value


def _ip_address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address as a string, got {type(value).__name__}")
    if value == "":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address (\"::\": every address of "
                         "both stacks)") from None


def _forwarded_allow_ips(value: Any) -> str:
    """gunicorn's --forwarded-allow-ips: IP addresses, comma-separated; "" trusts nobody."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string like \"127.0.0.1\", got {type(value).__name__}")
    addresses = [part.strip() for part in value.split(",") if part.strip()]
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address (a list like \"127.0.0.1\"; "
                             "\"\" trusts nobody)") from None
    return ",".join(addresses)


# A host name as DNS has it (RFC 1123 labels), with at least two labels and a last one that is
# not a number: what an ACME CA issues a certificate for (no wildcard: that needs DNS-01).
_DNS_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN = re.compile(rf"(?=.{{1,253}}\Z)(?:{_DNS_LABEL}\.)+(?![0-9]+\Z){_DNS_LABEL}")


def _domains(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list like [\"example.com\"], got {type(value).__name__}")
    result: list[str] = []
    for name in value:
        if not isinstance(name, str):
            raise ValueError(f"expected domain names as strings, got {type(name).__name__}")
        domain = name.lower()
        if not DOMAIN.fullmatch(domain):
            raise ValueError(f"{name!r} is not a domain name (labels of letters, digits and '-', "
                             "separated by dots, at least two; no wildcard)")
        if domain in result:
            raise ValueError(f"{name!r} is listed twice")
        result.append(domain)
    return tuple(result)


def _email(value: Any) -> str:
    return _string(r"[^@\s]+@[^@\s]+\.[^@\s]+", "an email address", empty_ok=True)(value)


def _acme_directory(value: Any) -> str:
    return _string(r"https://[^\s]+", "an https URL of an ACME directory", empty_ok=True)(value)


def _absolute_path(value: Any) -> str:
    return _string(r"/[^\0\n]*", "an absolute path", empty_ok=True)(value)


def _repository_url(value: Any) -> str:
    url = _string(r"\S*", "a git URL", empty_ok=True)(value)
    if url.startswith("-"):
        raise ValueError(f"{url!r} is not a git URL (it starts with '-')")
    if "\n" in url or "\0" in url:
        raise ValueError("a git URL cannot contain control characters")
    return url


class TableError(ValueError):
    """A bad entry of a table of names (``[app.environment]``, ``[processes]``)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__(reason)


ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by bluegreen or by systemd for every process of the app: a setting must not hide them.
RESERVED_ENVIRONMENT = frozenset({
    "PATH", "VIRTUAL_ENV", "CREDENTIALS_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM",
    "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "MAINPID", "NOTIFY_SOCKET", "WATCHDOG_PID",
    "WATCHDOG_USEC",
})


def environment_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an environment variable of the app (None if it can)."""
    if not ENVIRONMENT_NAME.fullmatch(name):
        return "not a valid environment variable name (letters, digits, '_'; not a digit first)"
    if name.startswith("BLUEGREEN_") or name in RESERVED_ENVIRONMENT:
        return f"{name} is set by bluegreen or systemd and cannot be overridden"
    return None


def _environment_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of NAME = \"value\", got {type(value).__name__}")
    result = {}
    for name, setting in value.items():
        problem = environment_name_problem(name)
        if problem:
            raise TableError(name, problem)
        if not isinstance(setting, str):
            raise TableError(name, f"expected a string (quote it: {name} = \"{setting}\"), "
                             f"got {type(setting).__name__}")
        if "\n" in setting or "\0" in setting:
            raise TableError(name, "a value cannot contain a newline or NUL")
        result[name] = setting
    return result


PROCESS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
# "web" is the instance bluegreen runs itself, "release" the release phase (migrate_command).
RESERVED_PROCESSES = frozenset({"web", "release"})


def _process_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of NAME = \"command\", got {type(value).__name__}")
    result = {}
    for name, command in value.items():
        if not PROCESS_NAME.fullmatch(name):
            raise TableError(name, "not a process name (letters, digits, '-', '_'; at most 32)")
        if name in RESERVED_PROCESSES:
            raise TableError(name, f"{name!r} is not a worker: use "
                             + ("app.wsgi" if name == "web" else "release.migrate_command"))
        if not isinstance(command, str):
            raise TableError(name, f"expected a shell command as a string, got {type(command).__name__}")
        if "\n" in command or "\0" in command:
            raise TableError(name, "a command cannot contain a newline or NUL")
        result[name] = command
    return result


def parse_port_range(value: Any) -> PortRange:
    if not isinstance(value, str):
        raise ValueError(f"expected a string like '8000-8999', got {type(value).__name__}")
    match = re.fullmatch(r"(\d{1,5})-(\d{1,5})", value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a range like '8000-8999'")
    first, last = int(match[1]), int(match[2])
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"{value!r} must lie within 1024-65535 with the first port not above the last")
    if last - first < 1:
        raise ValueError(f"{value!r} must hold at least two ports (old and new instance)")
    return PortRange(first, last)


def parse_listen_address(value: Any) -> ListenAddress:
    if not isinstance(value, str):
        raise ValueError(f"expected a string like '127.0.0.1:5001', got {type(value).__name__}")
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9A-Za-z.-]+):(\d{1,5})", value)
    if not match:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return ListenAddress(host, port)


@dataclass(frozen=True)
class Key:
    section: str | None
    name: str
    parse: Callable[[Any], Any]
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def applies(self) -> Applies:
        """When a change of this key takes effect (a whole section, or the key by name)."""
        return _APPLIES.get(self.dotted) or _APPLIES[self.section or self.name]


KEYS: tuple[Key, ...] = (
    Key("repository", "url", _repository_url,
        "Git URL of the application's repository (https, ssh, file or a local path). "
        "Empty: nothing is deployed until it is set."),
    Key("repository", "branch", _string(r"[A-Za-z0-9._/][A-Za-z0-9._/-]*", "a branch name"),
        "Branch whose head is deployed when no ref is given."),
    Key("repository", "poll_interval", _number(1, 86400),
        "Seconds between two looks at the remote branch."),
    Key("repository", "watch", _boolean,
        "Deploy each new commit of the branch by itself; false: deploy only when asked."),
    Key("repository", "ssh_known_hosts", _known_hosts,
        "The ssh host keys of an ssh repository.url, as known_hosts lines (ssh-keyscan "
        "HOST); ssh accepts no other. The key is the credential ssh-key."),
    Key("app", "wsgi", _wsgi_app,
        "WSGI application gunicorn serves, as MODULE:CALLABLE relative to the release (a bare "
        "MODULE, as Django's \"mysite.wsgi\", is MODULE:application); unset: the one the "
        "Procfile's web line gives gunicorn, else app:app."),
    Key("app", "asgi", _string(WSGI_APP.pattern, "MODULE:CALLABLE", empty_ok=True),
        "ASGI application (FastAPI, Starlette, Django's asgi.py) gunicorn serves with uvicorn's "
        "worker, which the release must pin; instead of app.wsgi. Unset: the one the Procfile's "
        "web line gives uvicorn (or gunicorn -k uvicorn...), if any."),
    Key("app", "health_path", _string(r"/[\w./?=&%-]*", "an absolute URL path", empty_ok=True),
        "Path probed on each instance; only a 2xx answer is healthy. Unset: /health, and \"/\" "
        "if the app answers 404 there; any answer but a 5xx or a 400 is healthy then (the app "
        "is up and answering: a redirect, 401, 403, 404)."),
    Key("app", "workers", _integer(1, 64), "gunicorn worker processes per instance."),
    Key("app", "instances", _integer(1, 16),
        "Instances of the serving release, each with its own port and forwarder on the public "
        "port (SO_REUSEPORT: the kernel spreads connections); the others carry the traffic while "
        "systemd restarts one that died."),
    Key("app", "worker_class", _string(r"sync|gthread", "'sync' or 'gthread'"),
        "gunicorn worker class: sync (one request per worker) or gthread (keep-alive)."),
    Key("app", "team", _string(r"[A-Za-z0-9_-]*", "letters, digits, '-' or '_'"),
        "Team identifier, exported to the app as TEAM_NUMBER and substituted for {team} "
        "in repository.url."),
    Key("app", "health_host", _string(r"[A-Za-z0-9.:\[\]-]+", "a host name", empty_ok=True),
        "Host header of the health checks (apps that check Host, as Django's ALLOWED_HOSTS "
        "does, must accept it). Empty: the first of app.domains, else localhost."),
    Key("app", "network", _choice(Network),
        "What the app's processes may reach: \"any\" (its database, DNS, APIs) or "
        "\"loopback\" (this host only)."),
    Key("app", "environment", _environment_table,
        "Table of NAME = \"value\" settings for every process of the app (instances, the "
        "release phase, workers); {data_dir} is replaced by the data directory."),
    Key("app", "forwarded_allow_ips", _forwarded_allow_ips,
        "Addresses gunicorn believes X-Forwarded-Proto (and the other secure-scheme headers) "
        "from, comma-separated; every request reaches the instance from the forwarder on "
        "127.0.0.1, so \"127.0.0.1\" believes whatever reaches the public port: only behind a "
        "TLS proxy that alone can reach it. Empty: nobody."),
    Key("app", "domains", _domains,
        "Domain names the front (bluegreen-front.service, Caddy) serves this app on over HTTPS, "
        "with certificates from front.acme_ca; http redirects to https. An app with domains "
        "gets its public port on 127.0.0.1 and believes the X-Forwarded-* headers from there "
        "(the front's), unless ports.public_address and app.forwarded_allow_ips say otherwise. "
        "No two apps may list the same name. The front follows at reload; the public port's "
        "address and the trust, at the next deploy."),
    Key("ports", "public", _integer(1, 65535), "Port the forwarder listens on for clients."),
    Key("ports", "range", parse_port_range, "Ports instances are started on, FIRST-LAST."),
    Key("ports", "public_address", _ip_address,
        "Address the forwarder listens on: \"::\" every address of IPv4 and IPv6, \"0.0.0.0\" "
        "every IPv4 address, or one address (\"127.0.0.1\" behind a TLS proxy on this host). "
        "Unset: \"::\", but a port already served on \"0.0.0.0\" stays there."),
    Key("ports", "max_connections", _integer(1, 65536),
        "Connections the forwarder serves at once (socat's max-children); more wait in the "
        "listen queue."),
    Key("api", "listen", parse_listen_address,
        "TCP address of the HTTP API, HOST:PORT; changes over TCP need the API token."),
    Key("health", "interval", _number(0.05, 3600), "Seconds between two health checks."),
    Key("health", "timeout", _number(0.05, 600), "Seconds one health check may take."),
    Key("health", "healthy_threshold", _integer(1, 100),
        "Consecutive passes that make a new instance healthy."),
    Key("health", "unhealthy_threshold", _integer(1, 100),
        "Consecutive failures that make the serving instance unhealthy (and trigger recovery)."),
    Key("health", "deadline", _number(1, 3600),
        "Seconds a new instance has to become healthy before the deploy fails."),
    Key("release", "build_command", _command,
        "Shell command run in a new release's directory before it is verified, with the app's "
        "settings but only release.build_secrets of its secrets. Empty: the build steps of the "
        "Procfile's web line (collectstatic), if any."),
    Key("release", "check_command", _command,
        "Shell command that must succeed in a new release's directory (empty: none)."),
    Key("release", "migrate_command", _command,
        "Shell command run once per deploy before the new release starts, as the app's user "
        "with its environment (e.g. \"flask db upgrade\"). Empty: the Procfile's release: line, "
        "else a migrate step of its web line."),
    Key("release", "collectstatic", _boolean,
        "Run Django's collectstatic at build in a release with a manage.py whose settings "
        "install django.contrib.staticfiles and set STATIC_ROOT (unless a build step runs it)."),
    Key("release", "build_secrets", _secret_names,
        "Names of the app's secrets the build, collectstatic and check commands get in their "
        "environment; the others never reach a build, which sees a placeholder value in their "
        "stead (settings that read one at import, as Django's SECRET_KEY, still load)."),
    Key("release", "timeout", _number(1, 7200),
        "Seconds the dependency install and the build, check and migrate commands may take, "
        "each."),
    Key("release", "keep", _integer(1, 1000),
        "Releases kept on disk, besides the serving one and the rollback target."),
    Key("front", "email", _email,
        "The ACME account's email address, for the CA's notices (expiry, revocation); "
        "bluegreen.toml only, for every app."),
    Key("front", "acme_ca", _acme_directory,
        "The ACME directory the front gets certificates from. Empty: Let's Encrypt's, "
        f"{LETSENCRYPT}."),
    Key("front", "acme_ca_root", _absolute_path,
        "A PEM file of the root certificates the ACME server's own TLS chains to, for a "
        "private CA. Empty: the system's."),
    Key("canary", "share", parse_share,
        "Share of new connections the new release gets first, from 0 to 1 or as \"25%\" "
        "(0: no canary). Above 0 every deploy that replaces a serving release is a canary; "
        "`bluegreenctl deploy --canary` sets it for one deploy."),
    Key("canary", "duration", _number(1, 86400),
        "Seconds the canary runs before it is promoted (earlier when its errors already "
        "decide, or `bluegreenctl promote`)."),
    Key("canary", "max_error_rate", _number(0, 1),
        "How far the new release's share of 5xx answers may exceed the old release's over the "
        "canary (0.05: five percentage points) before it is aborted."),
    Key("canary", "min_requests", _integer(0, 100000000),
        "Answers of the new release below which its error rate decides nothing: the decision "
        "waits for them, up to canary.duration; then the canary is promoted on its health "
        "checks alone, and the record says so."),
    Key(None, "forwarder", _choice(Forwarder),
        "What carries the public port to the instance: \"socat\" (a process per connection), "
        "\"proxy\" (bluegreen's own, one asyncio process; faster with short connections) or "
        "\"haproxy\" (Debian's haproxy, HTTP-aware: keep-alive clients move at their next "
        "request, X-Forwarded-For, slow clients held off the app) or \"direct\" (no process "
        "between client and app: each instance listens on the public port itself, and the "
        "kernel is told which one gets new connections)."),
    Key(None, "drain_timeout", _number(0, 600),
        "Seconds the old release gets to finish its in-flight requests after the switch."),
    Key(None, "post_switch_watch", _number(0, 3600),
        "Seconds the new release is watched after the switch, the old one kept ready; "
        "if it turns unhealthy then, traffic goes back to the old one (0: no watch)."),
    Key(None, "history_limit", _integer(10, 1000000),
        "Deployment records kept; older ones are deleted."),
    Key(None, "processes", _process_table,
        "Table of NAME = \"command\": the app's workers, added to (or replacing) the "
        "Procfile's process types; \"\" removes one."),
)

_APPLIES: dict[str, Applies] = {
    "repository": Applies.NOW,
    "app": Applies.NEXT_DEPLOY,
    # The front's routes; the public port's address and the trust follow at the next deploy.
    "app.domains": Applies.NOW,
    "front": Applies.NOW,
    "canary": Applies.NOW,
    "ports.public": Applies.NEXT_DEPLOY,
    "ports.public_address": Applies.NEXT_DEPLOY,
    "ports.max_connections": Applies.NEXT_DEPLOY,
    "ports.range": Applies.NOW,
    "api.listen": Applies.API_SOCKET,
    "health": Applies.NOW,
    "release": Applies.NOW,
    "forwarder": Applies.NEXT_DEPLOY,
    "drain_timeout": Applies.NOW,
    "post_switch_watch": Applies.NOW,
    "history_limit": Applies.NOW,
    "processes": Applies.NEXT_DEPLOY,
}

# Keys whose value is a table of the user's own names, not a section of known keys.
_TABLES = {(key.section, key.name) for key in KEYS if key.parse in (_environment_table, _process_table)}

_SECTIONS = {key.section for key in KEYS if key.section}


def _line_of(text: str, section: str | None, name: str) -> int | None:
    """Best-effort line number of a key, for error messages (tomllib reports none for values)."""
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?", stripped)
        if header:
            current = header[1]
            continue
        if current == section and re.match(rf"{re.escape(name)}\s*=", stripped):
            return number
    return None


def load_mapping(data: Mapping[str, Any], source: str, text: str = "") -> Config:
    """Build a Config from parsed TOML, rejecting unknown keys and bad values."""

    def error(section: str | None, name: str, reason: str) -> ConfigError:
        dotted = f"{section}.{name}" if section else name
        line = _line_of(text, section, name) if text else None
        where = f"{source}:{line}" if line else source
        return ConfigError(f"{where}: {dotted}: {reason}")

    known = {(key.section, key.name): key for key in KEYS}
    values: dict[tuple[str | None, str], Any] = {}
    for name, value in data.items():
        if isinstance(value, dict) and (None, name) in _TABLES:
            values[(None, name)] = value
        elif isinstance(value, dict):
            if name not in _SECTIONS:
                raise error(None, name, f"unknown section [{name}]")
            for sub, subvalue in value.items():
                key = known.get((name, sub))
                if key is None:
                    raise error(name, sub, "unknown key")
                values[(name, sub)] = subvalue
        else:
            key = known.get((None, name))
            if key is None:
                raise error(None, name, "unknown key" if name not in _SECTIONS
                            else f"[{name}] must be a table")
            values[(None, name)] = value

    parsed: dict[tuple[str | None, str], Any] = {}
    for where, value in values.items():
        try:
            parsed[where] = known[where].parse(value)
        except TableError as exc:
            table = ".".join(part for part in where if part)
            line = _line_of(text, table, exc.name) if text else None
            if line is None and text:
                line = _line_of(text, where[0], where[1])
            place = f"{source}:{line}" if line else source
            raise ConfigError(f"{place}: {table}.{exc.name}: {exc}") from None
        except ValueError as exc:
            raise error(where[0], where[1], str(exc)) from None

    def section(cls: Any, name: str) -> Any:
        return cls(**{key: value for (sec, key), value in parsed.items() if sec == name})

    config = Config(
        repository=section(RepositoryConfig, "repository"),
        app=section(AppConfig, "app"),
        ports=section(PortsConfig, "ports"),
        api=section(ApiConfig, "api"),
        health=section(HealthConfig, "health"),
        release=section(ReleaseConfig, "release"),
        front=section(FrontConfig, "front"),
        canary=section(CanaryConfig, "canary"),
        source=source,
        **{key: value for (sec, key), value in parsed.items() if sec is None},
    )
    if config.ports.public in config.ports.range:
        raise error("ports", "public", f"{config.ports.public} lies inside ports.range {config.ports.range}")
    if config.app.instances > 1 and config.forwarder not in (Forwarder.SOCAT, Forwarder.DIRECT):
        raise error("app", "instances", "more than one instance needs forwarder = \"socat\" "
                    "or \"direct\"")
    if config.app.domains and config.forwarder == Forwarder.HAPROXY:
        raise error("app", "domains", "the front needs forwarder = \"socat\" or \"proxy\" "
                    "(haproxy replaces the X-Forwarded-* headers the front sets)")
    if config.app.asgi and config.app.wsgi:
        raise error("app", "asgi", "app.wsgi names the app already: set one of the two")
    if config.health.timeout > config.health.deadline:
        raise error("health", "timeout", "must not exceed health.deadline")
    return behind_front(config)


def behind_front(config: Config) -> Config:
    """An app with domains is served by the front (front.py), which sets the X-Forwarded-*
    headers from 127.0.0.1: its public port listens there alone, so that no client can send
    them, and its instances believe them from there; unless the file says otherwise."""
    if not config.app.domains:
        return config
    ports, app = config.ports, config.app
    if not ports.public_address:
        ports = dataclasses.replace(ports, public_address="127.0.0.1")
    if not app.forwarded_allow_ips:
        app = dataclasses.replace(app, forwarded_allow_ips="127.0.0.1")
    return dataclasses.replace(config, ports=ports, app=app)


ENVIRONMENT = {
    "TEAM_REPO_URL": ("repository", "url"),
    "CODE_REFRESH_INTERVAL": ("repository", "poll_interval"),
    "TEAM_NUMBER": ("app", "team"),
}


def _environment_value(variable: str, raw: str) -> Any:
    if variable == "CODE_REFRESH_INTERVAL":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"${variable}: {raw!r} is not a number of seconds") from None
    return raw


def _syntax_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """FILE:LINE: KEY: REASON for a TOML syntax error (tomllib puts the line in its message)."""
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
    if not match:
        return f"{path}: {exc}"
    number = int(match[1])
    reason = f"{str(exc)[:match.start()]} (column {match[2]})"
    section = ""
    lines = text.splitlines()
    for line in lines[:number - 1]:
        header = re.fullmatch(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?", line)
        if header:
            section = header[1] + "."
    key = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", lines[number - 1]) if number <= len(lines) else None
    return f"{path}:{number}: {section}{key[1]}: {reason}" if key else f"{path}:{number}: {reason}"


def line_of(text: str, dotted: str) -> int | None:
    """The line of a key (SECTION.NAME or NAME) in a file's text, for error messages."""
    section, _, name = dotted.rpartition(".")
    return _line_of(text, section or None, name)


def load(path: Path = DEFAULT_PATH, environ: Mapping[str, str] | None = None,
         data_dir: Path = DATA_DIR, app_name: str = DEFAULT_APP) -> Config:
    """Read the config file (a missing file means all defaults), then apply the environment."""
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(path, text, exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc}") from None

    for variable, (section, name) in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            break  # reported by load_mapping below
        table[name] = _environment_value(variable, raw)

    config = dataclasses.replace(load_mapping(data, source=str(path), text=text), app_name=app_name)
    if "{data_dir}" in "".join(config.app.environment.values()):
        environment = {name: value.replace("{data_dir}", str(data_dir))
                       for name, value in config.app.environment.items()}
        config = dataclasses.replace(config, app=dataclasses.replace(config.app, environment=environment))
    if config.app.team and "{team}" in config.repository.url:
        url = config.repository.url.replace("{team}", config.app.team)
        config = dataclasses.replace(config, repository=dataclasses.replace(config.repository, url=url))
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as a TOML-shaped dict of plain values (the inverse of load_mapping)."""
    result: dict[str, Any] = {}
    for key in KEYS:
        holder: Any = getattr(config, key.section) if key.section else config
        value = getattr(holder, key.name)
        if isinstance(value, (PortRange, ListenAddress)):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        if key.section:
            result.setdefault(key.section, {})[key.name] = value
        else:
            result[key.name] = value
    return result


def _value(config: Config, key: Key) -> Any:
    holder: Any = getattr(config, key.section) if key.section else config
    return getattr(holder, key.name)


def changed(old: Config, new: Config) -> list[Key]:
    """The keys whose value differs between two configurations."""
    return [key for key in KEYS if _value(old, key) != _value(new, key)]


def with_deployed(config: Config, deployed: Config) -> Config:
    """``config`` with the keys that apply at the next deploy as ``deployed`` has them."""
    for key in KEYS:
        if key.applies != Applies.NEXT_DEPLOY:
            continue
        value = _value(deployed, key)
        if key.section:
            section = dataclasses.replace(getattr(config, key.section), **{key.name: value})
            config = dataclasses.replace(config, **{key.section: section})
        else:
            config = dataclasses.replace(config, **{key.name: value})
    return config
