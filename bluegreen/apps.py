"""Apps: bluegreen.toml is the default app, and every /etc/bluegreen/apps/NAME.toml is one more.

Each app has its own repository, public port, settings, secrets, data directory, releases and
records; one controller runs them all (one Controller each, see appmanager.py). The default app
keeps the places it always had, so a host with bluegreen.toml alone runs as before:

    app       state (records, mirror, releases)   secrets                     data
    default   /var/lib/bluegreen                  /etc/bluegreen/secrets      /var/lib/bluegreen/data
    NAME      /var/lib/bluegreen/apps/NAME        /etc/bluegreen/secrets/NAME /var/lib/bluegreen/app-data/NAME

Units stay named by port (a port is the host's, whichever app uses it); each instance's
settings file says which app it is (BLUEGREEN_APP, missing for instances of older versions:
the default app), so that an app's reconciliation never touches another's units.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path

from bluegreen import config as configuration
from bluegreen.config import DEFAULT_APP, Config, ConfigError, Forwarder

APPS_DIR = Path("/etc/bluegreen/apps")
STATE_DIR = Path("/var/lib/bluegreen")
SECRETS_DIR = Path("/etc/bluegreen/secrets")
# The data directories of the apps but the default one (ReadWritePaths= of their units).
APP_DATA_STATE_DIRECTORY = "bluegreen/app-data"

# Lower-case letters, digits and '_': safe in unit names, D-Bus object paths, URLs, file names
# and environment variable names (a worker unit is bluegreen-worker@NAME-PORT-PROCESS).
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an app (None if it can)."""
    if not NAME.fullmatch(name):
        return ("not an app name (a lower-case letter, then lower-case letters, digits or '_'; "
                "at most 32)")
    if name == DEFAULT_APP:
        return f"{DEFAULT_APP!r} is the app of {configuration.DEFAULT_PATH}"
    return None


def state_dir(name: str, root: Path = STATE_DIR) -> Path:
    """Where the app's records, mirror, releases and environments live."""
    return root if name == DEFAULT_APP else root / "apps" / name


def secrets_dir(name: str) -> Path:
    return SECRETS_DIR if name == DEFAULT_APP else SECRETS_DIR / name


def data_state_directory(name: str) -> str:
    """The app's data directory, as systemd's StateDirectory= names it (under /var/lib)."""
    return "bluegreen/data" if name == DEFAULT_APP else f"{APP_DATA_STATE_DIRECTORY}/{name}"


def data_dir(name: str) -> Path:
    return Path("/var/lib") / data_state_directory(name)


def credential(name: str) -> str:
    """The prefix of the app's secrets' credential IDs: the file NAME of the app's secrets is the
    credential ID_NAME (the directory of an app NAME is loaded as ID; the default app's files,
    one by one, since its directory holds the other apps')."""
    return "secrets" if name == DEFAULT_APP else f"secrets_{name}"


def files(apps_dir: Path = APPS_DIR) -> dict[str, Path]:
    """The app files, by app name; a file whose name is no app name is a ConfigError."""
    try:
        paths = sorted(apps_dir.glob("*.toml"))
    except OSError as exc:
        raise ConfigError(f"{apps_dir}: cannot read: {exc.strerror}") from None
    found = {}
    for path in paths:
        problem = name_problem(path.stem)
        if problem:
            raise ConfigError(f"{path}: {problem}")
        found[path.stem] = path
    return found


def load_app(name: str, path: Path) -> Config:
    """One app's file: like bluegreen.toml, but what is the host's stays in bluegreen.toml."""
    config = configuration.load(path, environ={}, data_dir=data_dir(name), app_name=name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""

    def error(dotted: str, reason: str) -> ConfigError:
        line = configuration.line_of(text, dotted)
        return ConfigError(f"{path}:{line}: {dotted}: {reason}" if line else
                           f"{path}: {dotted}: {reason}")

    if config.api != configuration.ApiConfig():
        raise error("api.listen", f"the HTTP API is the host's: set it in {configuration.DEFAULT_PATH}")
    if config.front != configuration.FrontConfig():
        raise error("front", f"the HTTPS front is the host's: set [front] in {configuration.DEFAULT_PATH}")
    if config.forwarder == Forwarder.HAPROXY:
        raise error("forwarder", "\"haproxy\" serves the default app only (one haproxy for the "
                    "host): use \"socat\" or \"proxy\"")
    return config


def load(default_path: Path = configuration.DEFAULT_PATH, apps_dir: Path = APPS_DIR,
         environ: Mapping[str, str] | None = None) -> dict[str, Config]:
    """Every app's settings, the default app's first; raises ConfigError for a bad file or
    two apps on one public port or one domain."""
    configs = {DEFAULT_APP: configuration.load(default_path, environ)}
    for name, path in files(apps_dir).items():
        configs[name] = load_app(name, path)
    check_public_ports(configs)
    check_domains(configs)
    return configs


def check_public_ports(configs: Mapping[str, Config]) -> None:
    """Two apps may not share a public port, and no app's public port may be where another
    starts its instances."""
    owners: dict[int, Config] = {}
    for config in configs.values():
        other = owners.get(config.ports.public)
        if other is not None:
            raise _port_error(config, f"{config.ports.public} is already the public port of the "
                              f"app {other.app_name} ({other.source})")
        owners[config.ports.public] = config
    for config in configs.values():
        for other in configs.values():
            if other is not config and config.ports.public in other.ports.range:
                raise _port_error(config, f"{config.ports.public} lies inside ports.range "
                                  f"{other.ports.range} of the app {other.app_name} ({other.source})")


def port_user(app: str, port: int, served: Mapping[str, Collection[int]]) -> str | None:
    """The other app whose forwarders serve ``port`` (None if none does)."""
    return next((other for other, ports in served.items() if other != app and port in ports), None)


def check_served_ports(configs: Mapping[str, Config], served: Mapping[str, Collection[int]]) -> None:
    """No app's public port may be one that another app's forwarders serve (``served``, by
    app). The files alone do not say it: a changed ports.public applies at the app's next
    deploy, and until then its old port still serves. A listener of another app joining it
    there would share its traffic."""
    for config in configs.values():
        user = port_user(config.app_name, config.ports.public, served)
        if user is not None:
            raise _port_error(config, f"the app {config.app_name} cannot take port "
                              f"{config.ports.public}: the app {user} still serves on it "
                              "(a new ports.public applies at the app's next deploy)")


def _port_error(config: Config, reason: str) -> ConfigError:
    return ConfigError(f"{_where(config, 'ports.public')}: ports.public: {reason}")


def check_domains(configs: Mapping[str, Config]) -> None:
    """No domain may be two apps': the error names both, and where each lists it."""
    owners: dict[str, Config] = {}
    for config in configs.values():
        for domain in config.app.domains:
            other = owners.get(domain)
            if other is not None:
                raise ConfigError(f"{_where(config, 'app.domains')}: app.domains: {domain!r} is a "
                                  f"domain of the app {other.app_name} ({other.source}) already: the app "
                                  f"{config.app_name} cannot have it too")
            owners[domain] = config


def _where(config: Config, key: str) -> str:
    """The file and line of ``key`` in the app's file (the file alone if it is not there)."""
    try:
        text = Path(config.source).read_text(encoding="utf-8")
    except OSError:
        return config.source
    line = configuration.line_of(text, key)
    return f"{config.source}:{line}" if line else config.source
