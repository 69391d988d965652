"""App instances: bluegreen-app@PORT.service units, the socket unit that holds each one's port,
and the settings file each one reads.

bluegreen-app@PORT.socket listens on 127.0.0.1:PORT from before gunicorn starts until the
instance stops, and hands the listener to gunicorn: while systemd restarts a gunicorn that
died, the port stays bound, so no other local user can take it and be sent the public port's
traffic, and the connections that come meanwhile wait for the new gunicorn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bluegreen import drainflag, sockdiag
from bluegreen.config import DEFAULT_APP
from bluegreen.files import atomic_write, environment_file, read_environment_file
from bluegreen.forwarders import direct
from bluegreen.release import appenv
from bluegreen.systemd import Systemd, UnitStatus

PATTERN = "bluegreen-app@*.service"
SOCKET_PATTERN = "bluegreen-app@*.socket"
_NAME = re.compile(r"bluegreen-app@(\d{1,5})\.service")
_SOCKET_NAME = re.compile(r"bluegreen-app@(\d{1,5})\.socket")
# The owner the kernel gives a listener systemd created (a socket unit's): root. A
# SO_REUSEPORT group takes only listeners of one owner, so beside the public listeners of
# forwarder = "direct" no other kind of forwarder can listen.
SYSTEMD_UID = 0
# gunicorn's worker class for ASGI apps: uvicorn's from the release's environment, the drain
# flag around the app (asgiworker.py).
ASGI_WORKER_CLASS = "bluegreen.asgiworker.UvicornWorker"


def unit(port: int) -> str:
    return f"bluegreen-app@{port}.service"


def socket_unit(port: int) -> str:
    return f"bluegreen-app@{port}.socket"


def port_of(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match[1]) if match else None


def socket_port_of(name: str) -> int | None:
    match = _SOCKET_NAME.fullmatch(name)
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
    web_dir: str = ""  # the directory of the release the app is imported from (procfile.py)
    worker_connections: int | None = None  # gunicorn's own limit (direct.worker_connections)

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
            # The unit's --chdir is ${BLUEGREEN_RELEASE_DIR}${BLUEGREEN_WEB_DIR}: the release's
            # directory for a settings file written before this key was.
            "BLUEGREEN_WEB_DIR": f"/{self.web_dir}" if self.web_dir else "",
            **({"BLUEGREEN_DRAIN_FILE": str(self.drain_file)} if self.drain_file else {}),
            **({"BLUEGREEN_WORKER_CONNECTIONS": str(self.worker_connections)}
               if self.worker_connections else {}),
        }


INSTANCE_KEYS = frozenset({"BLUEGREEN_WSGI", "BLUEGREEN_WORKERS", "BLUEGREEN_WORKER_CLASS",
                           "BLUEGREEN_PORT", "BLUEGREEN_DRAIN_FILE",
                           "BLUEGREEN_FORWARDED_ALLOW_IPS", "BLUEGREEN_WEB_DIR",
                           "BLUEGREEN_WORKER_CONNECTIONS"})


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


async def start(systemd: Systemd, port: int, public: bool = False) -> None:
    """Bind the port (the socket unit: it fails if another program holds the port), and the
    public port too if ``public`` (forwarder = "direct"), then start gunicorn on them."""
    sockets = [socket_unit(port), *([direct.socket_unit(port)] if public else [])]
    for name in (*sockets, unit(port)):
        await systemd.reset_failed(name)
    for name in (*sockets, unit(port)):
        await systemd.start_unit(name)


async def stop(systemd: Systemd, port: int) -> None:
    """Stop the instance and free its port.

    The socket goes first: systemd closes its copy of the listener, and the instance, its
    only holder then, serves what waits in the queue until its graceful stop closes it, as a
    gunicorn that bound the port itself would. The other way round, the listener would outlive
    gunicorn: a connection queued meanwhile would start the instance again, or be reset when
    the socket closes.
    """
    await systemd.stop_unit(socket_unit(port))
    await systemd.stop_unit(direct.socket_unit(port))
    await systemd.stop_unit(unit(port))
    await systemd.reset_failed(unit(port))
    await systemd.reset_failed(socket_unit(port))
    await systemd.reset_failed(direct.socket_unit(port))
    appenv.take_secrets(systemd, unit(port))
    direct.forget(systemd, port)


async def failure(systemd: Systemd, port: int) -> str | None:
    """Why the instance is not (or no longer) running, or None while it runs."""
    return _failure(await systemd.status(unit(port)))


async def boot_failure(systemd: Systemd, port: int) -> str | None:
    """Why a new instance, not healthy yet, failed, or None while it boots. A death systemd
    has made good (Restart=) counts: a release whose every worker fails to boot can make
    gunicorn 20.1 exit 1 rather than 3 (a second worker's failure while it halts for the
    first), and systemd restarts it again and again, running between two looks."""
    status = await systemd.status(unit(port))
    if status.restarts:
        times = "1 time" if status.restarts == 1 else f"{status.restarts} times"
        return (f"{unit(port)} died while starting and was restarted by systemd ({times}); "
                f"its journal says why: journalctl -u {unit(port)}")
    return _failure(status)


def _failure(status: UnitStatus) -> str | None:
    if status.active_state in ("active", "reloading") or (
            status.active_state == "activating" and status.sub_state == "start"):
        return None
    return f"{status.name} {status.describe_failure()}"


async def foreign_listener(systemd: Systemd, port: int) -> str | None:
    """Why 127.0.0.1:port is not served by the instance's own processes (None if it is).

    The instance's listener is its socket unit's: the kernel names root, who created it, as
    its owner, though gunicorn accepts on it. Root is its owner only while that socket unit is
    active; gunicorn's user is, should the instance run without it (bound by gunicorn itself).
    """
    status = await systemd.status(unit(port))
    socket = await systemd.status(socket_unit(port))
    listening = sockdiag.listeners(port)
    if not listening:
        return f"nothing listens on port {port}"
    owners = {status.uid} if status.uid >= 0 else set()
    if owners and socket.is_running:
        owners.add(SYSTEMD_UID)
    strangers = [s for s in listening if s.uid not in owners]
    if strangers:
        return (f"port {port} is also held by a process bluegreen did not start "
                f"(uid {strangers[0].uid}, not {unit(port)}'s {status.uid} or its socket's)")
    return None

