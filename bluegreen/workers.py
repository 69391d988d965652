"""The app's workers: bluegreen-worker@PORT-NAME.service units, one per process type of the
serving release (its Procfile's, or the configuration's ``[processes]``);
bluegreen-worker@APP-PORT-NAME.service for an app other than the default one.

PORT is the port of the release's instance, so the workers of a release are found by its port,
and the unit of each reads ``/run/bluegreen/workers/INSTANCE.env`` (INSTANCE: the unit's
instance name, PORT-NAME or APP-PORT-NAME). After a switch the new
release's workers start, then the old release's workers stop (SIGTERM, then TimeoutStopSec=).
A worker that fails to start is logged and shown, but never rolls a healthy web release back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bluegreen.config import DEFAULT_APP, Network
from bluegreen.files import atomic_write, environment_file, read_environment_file
from bluegreen.release import appenv
from bluegreen.release.transient import network_properties
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)

PATTERN = "bluegreen-worker@*.service"
# An app's name starts with a letter, a port with a digit: the app part cannot be mistaken.
_NAME = re.compile(r"bluegreen-worker@(?:([a-z][a-z0-9_]{0,31})-)?(\d{1,5})-"
                   r"([A-Za-z0-9][A-Za-z0-9_-]{0,31})\.service")


def instance(port: int, name: str, app: str = DEFAULT_APP) -> str:
    return f"{port}-{name}" if app == DEFAULT_APP else f"{app}-{port}-{name}"


def unit(port: int, name: str, app: str = DEFAULT_APP) -> str:
    return f"bluegreen-worker@{instance(port, name, app)}.service"


def parse_unit(unit_name: str) -> tuple[str, int, str] | None:
    """(app, port, process type) of a worker unit's name."""
    match = _NAME.fullmatch(unit_name)
    return (match[1] or DEFAULT_APP, int(match[2]), match[3]) if match else None


def env_path(run_dir: Path, port: int, name: str, app: str = DEFAULT_APP) -> Path:
    return run_dir / "workers" / f"{instance(port, name, app)}.env"


@dataclass(frozen=True)
class Worker:
    port: int
    name: str
    state: str  # systemd's ActiveState/SubState, e.g. "active/running", "failed/failed"
    release: str
    app: str = DEFAULT_APP

    @property
    def unit(self) -> str:
        return unit(self.port, self.name, self.app)


async def start(systemd: Systemd, run_dir: Path, port: int, commands: Mapping[str, str],
                environment: Mapping[str, str], network: Network,
                app: str = DEFAULT_APP) -> dict[str, str]:
    """Start the workers of the release on ``port``; return {name: why} for those that failed."""
    problems = {}
    for name, command in commands.items():
        values = {**environment, "BLUEGREEN_PROCESS": name, "BLUEGREEN_COMMAND": command}
        atomic_write(env_path(run_dir, port, name, app), environment_file(values), mode=0o600)
        try:
            await appenv.give_secrets(systemd, unit(port, name, app), app)
            await systemd.set_properties(unit(port, name, app), network_properties(network))
            await systemd.reset_failed(unit(port, name, app))
            await systemd.start_unit(unit(port, name, app))
        except (SystemdError, OSError) as exc:
            problems[name] = str(exc)
            log.error("worker %s of the release on port %d did not start: %s", name, port, exc)
    return problems


async def stop(systemd: Systemd, run_dir: Path, port: int | None = None,
               keep: int | None = None, app: str = DEFAULT_APP) -> None:
    """Stop the app's workers of the release on ``port`` (None: of every release but ``keep``)."""
    for status in await systemd.list_units(PATTERN):
        parsed = parse_unit(status.name)
        if parsed is None or parsed[0] != app or parsed[1] == keep or (
                port is not None and parsed[1] != port):
            continue
        try:
            await systemd.stop_unit(status.name)
            await systemd.reset_failed(status.name)
        except SystemdError as exc:
            log.error("could not stop %s: %s", status.name, exc)
            continue
        env_path(run_dir, parsed[1], parsed[2], app).unlink(missing_ok=True)
        appenv.take_secrets(systemd, status.name)


async def listing(systemd: Systemd, run_dir: Path, app: str = DEFAULT_APP) -> list[Worker]:
    """Every loaded worker unit of the app with its state and release."""
    found = []
    for status in await systemd.list_units(PATTERN):
        parsed = parse_unit(status.name)
        if parsed is None or parsed[0] != app:
            continue
        _, port, name = parsed
        release = read_environment_file(env_path(run_dir, port, name, app)).get("BLUEGREEN_RELEASE", "")
        found.append(Worker(port, name, f"{status.active_state}/{status.sub_state}", release, app))
    return sorted(found, key=lambda w: (w.port, w.name))
