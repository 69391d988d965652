"""App instances: bluegreen-app@PORT.service units and the settings file each one reads."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bluegreen import appenv, drainflag, sockdiag
from bluegreen.config import DEFAULT_APP
from bluegreen.files import atomic_write, environment_file, read_environment_file
from bluegreen.systemd import Systemd

PATTERN = "bluegreen-app@*.service"
_NAME = re.compile(r"bluegreen-app@(\d{1,5})\.service")


def unit(port: int) -> str:
    return f"bluegreen-app@{port}.service"


def port_of(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match[1]) if match else None


@dataclass(frozen=True)
class InstanceSpec:
    port: int
    wsgi: str
    workers: int
    worker_class: str
    app_environment: Mapping[str, str]  # appenv.environment(): the release's, for every process
    drain_file: Path | None = None  # the flag that makes it close kept-alive connections
    forwarded_allow_ips: str = ""  # whom gunicorn believes X-Forwarded-Proto from: nobody

    @property
    def release(self) -> str:
        return self.app_environment.get("BLUEGREEN_RELEASE", "")

    def environment(self) -> dict[str, str]:
        # Every key added here is the instance's own: INSTANCE_KEYS below names them.
        return {
            **self.app_environment,
            "BLUEGREEN_WSGI": self.wsgi,
            "BLUEGREEN_WORKERS": str(self.workers),
            "BLUEGREEN_WORKER_CLASS": self.worker_class,
            "BLUEGREEN_PORT": str(self.port),
            "BLUEGREEN_FORWARDED_ALLOW_IPS": self.forwarded_allow_ips,
            **({"BLUEGREEN_DRAIN_FILE": str(self.drain_file)} if self.drain_file else {}),
        }


INSTANCE_KEYS = frozenset({"BLUEGREEN_WSGI", "BLUEGREEN_WORKERS", "BLUEGREEN_WORKER_CLASS",
                           "BLUEGREEN_PORT", "BLUEGREEN_DRAIN_FILE",
                           "BLUEGREEN_FORWARDED_ALLOW_IPS"})


def env_path(run_dir: Path, port: int) -> Path:
    return run_dir / "instances" / f"{port}.env"


def write_env(run_dir: Path, spec: InstanceSpec) -> None:
    # Only systemd reads it (as root): the app's settings are nobody else's business.
    atomic_write(env_path(run_dir, spec.port), environment_file(spec.environment()), mode=0o600)


def read_env(run_dir: Path, port: int) -> dict[str, str]:
    """The settings an instance was started with ({} if its file is gone)."""
    return read_environment_file(env_path(run_dir, port))


def app_named(settings: Mapping[str, str]) -> str:
    """The app a settings file names (one of an older version names none: the default app)."""
    return settings.get("BLUEGREEN_APP", DEFAULT_APP)


def ports_with_env(run_dir: Path) -> set[int]:
    """The ports whose settings file exists: an instance runs there or is about to start."""
    try:
        return {int(path.stem) for path in (run_dir / "instances").glob("*.env")
                if path.stem.isdigit()}
    except OSError:
        return set()


def read_app_environment(run_dir: Path, port: int) -> dict[str, str]:
    """The release's environment an instance was started with, less what is the instance's
    own: what its release's other processes (workers) get."""
    return {name: value for name, value in read_env(run_dir, port).items()
            if name not in INSTANCE_KEYS}


def remove_env(run_dir: Path, port: int) -> None:
    env_path(run_dir, port).unlink(missing_ok=True)
    drainflag.clear(run_dir, port)


async def start(systemd: Systemd, port: int) -> None:
    await systemd.reset_failed(unit(port))
    await systemd.start_unit(unit(port))


async def stop(systemd: Systemd, port: int) -> None:
    await systemd.stop_unit(unit(port))
    await systemd.reset_failed(unit(port))
    appenv.take_secrets(systemd, unit(port))


async def failure(systemd: Systemd, port: int) -> str | None:
    """Why the instance is not (or no longer) running, or None while it runs."""
    status = await systemd.status(unit(port))
    if status.active_state in ("active", "reloading") or (
            status.active_state == "activating" and status.sub_state == "start"):
        return None
    return f"{unit(port)} {status.describe_failure()}"


async def foreign_listener(systemd: Systemd, port: int) -> str | None:
    """Why 127.0.0.1:port is not served by the instance's own processes (None if it is)."""
    status = await systemd.status(unit(port))
    listening = sockdiag.listeners(port)
    if not listening:
        return f"nothing listens on port {port}"
    strangers = [s for s in listening if status.uid < 0 or s.uid != status.uid]
    if strangers:
        return (f"port {port} is also held by a process bluegreen did not start "
                f"(uid {strangers[0].uid}, not {unit(port)}'s {status.uid})")
    return None

