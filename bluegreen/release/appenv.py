"""What every process of the app gets, whichever unit runs it (an instance, a worker, the
import check, the release phase): its user, its settings, its secrets, its data directory, its
Python environment and its network.

- the user ``bluegreen-app`` (from sysusers.d), the same for every release, so that files in
  the data directory outlive releases;
- the settings of ``[app.environment]`` and bluegreen's own ``BLUEGREEN_*`` variables, in the
  unit's environment;
- its secrets and no other app's, never in any unit's environment or on disk outside
  /etc/bluegreen/secrets: systemd loads them as credentials (LoadCredential=: of each file
  directly in /etc/bluegreen/secrets for the default app, of the directory
  /etc/bluegreen/secrets/NAME for the app NAME), and ``with-secrets`` exports them as the
  process starts. A transient unit gets them among its properties; an instance or a worker,
  a unit of a template shared by every app, in a drop-in of its own written before it starts;
- the data directory /var/lib/bluegreen/data (``StateDirectory=bluegreen/data``, mode 0700),
  /var/lib/bluegreen/app-data/NAME for the app NAME (see apps.py);
- the release's Python environment first on ``PATH``.

The unit files bluegreen-app@.service and bluegreen-worker@.service say the same in their own
words; this module says it for transient units and for the files those units read.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from bluegreen import apps
from bluegreen.config import DEFAULT_APP, Config
from bluegreen.release.transient import Command
from bluegreen.release.venvs import SYSTEM_PYTHON
from bluegreen.systemd import Systemd

log = logging.getLogger(__name__)

APP_USER = "bluegreen-app"
SECRETS_DIR = apps.SECRETS_DIR
WITH_SECRETS = "/usr/libexec/bluegreen/with-secrets"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Tasks the app's user may own when a command of the app starts more: its serving instances
# and workers (a process, or a thread, each) count too.
APP_TASKS_MAX = 4096
SECRETS_DROPIN = "50-bluegreen-secrets.conf"
# A secret's file name that reads the same in a unit file (no specifier '%', no quoting);
# with-secrets then refuses what is no variable name, saying so.
_SECRET_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def environment(config: Config, release: str, release_dir: Path, environment_dir: Path | None,
                deployment_id: int | str) -> dict[str, str]:
    """The environment of every process of a release (secrets excepted)."""
    values = dict(config.app.environment)
    if config.app.team:
        values["TEAM_NUMBER"] = config.app.team
    python = SYSTEM_PYTHON
    path = SYSTEM_PATH
    if environment_dir is not None:
        python = environment_dir / "bin" / "python3"
        path = f"{environment_dir / 'bin'}:{SYSTEM_PATH}"
        values["VIRTUAL_ENV"] = str(environment_dir)
    values.update({
        "PATH": path,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "BLUEGREEN_RELEASE": release,
        "BLUEGREEN_RELEASE_DIR": str(release_dir),
        "BLUEGREEN_DATA_DIR": str(apps.data_dir(config.app_name)),
        "BLUEGREEN_PYTHON": str(python),
        "BLUEGREEN_DEPLOYMENT_ID": str(deployment_id),
        "BLUEGREEN_APP": config.app_name,
    })
    return values


def prepare_data_dir(app_name: str) -> None:
    """Make the data directory of an app other than the default one, the app's user's own
    (the default app's is its units' StateDirectory=). Its parent stays root's, so that the
    controller, root without CAP_DAC_OVERRIDE, can look into it."""
    directory = apps.data_dir(app_name)
    if app_name == DEFAULT_APP or directory.is_dir():
        return
    try:
        user = pwd.getpwnam(APP_USER)
    except KeyError:
        raise FileNotFoundError(f"the user {APP_USER} does not exist") from None
    directory.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chown(directory, user.pw_uid, user.pw_gid)


def credentials(app_name: str = DEFAULT_APP) -> list[tuple[str, str]]:
    """LoadCredential= of the app's secrets: the directory secrets/NAME of the app NAME (none
    while it is missing); each regular file directly in the secrets directory, for the
    default app, whose subdirectories are the other apps' (systemd would load a directory
    with them)."""
    directory = apps.secrets_dir(app_name)
    if app_name != DEFAULT_APP:
        return [(apps.credential(app_name), str(directory))] if directory.is_dir() else []
    try:
        paths = sorted(directory.iterdir())
    except OSError:
        return []
    found = []
    for path in paths:
        if path.name.startswith(".") or path.is_symlink() or not path.is_file():
            continue  # what systemd leaves out when it loads a directory
        if not _SECRET_FILE.fullmatch(path.name):
            log.warning("secret %s ignored: not a name the app may set", path)
            continue
        found.append((f"{apps.credential(app_name)}_{path.name}", str(path)))
    return found


def secret_names(app_name: str) -> list[str]:
    """The names of the app's secrets (its variables')."""
    directory = apps.secrets_dir(app_name)
    try:
        paths = sorted(directory.iterdir())
    except OSError:
        return []
    return [path.name for path in paths if _SECRET_FILE.fullmatch(path.name)
            and not path.is_symlink() and path.is_file()]


def build_placeholder(name: str) -> str:
    """What a build sees for a secret of the app it is not given: settings that read the
    secret at import (Django's SECRET_KEY) load, and the secret stays out of the build."""
    return f"bluegreen-build-placeholder-not-the-secret-{name}"


def build_placeholders(app_name: str, given: Sequence[str],
                       environment: Mapping[str, str]) -> dict[str, str]:
    """A placeholder for each secret of the app that a build is not given (and that no
    setting of [app.environment] names)."""
    return {name: build_placeholder(name) for name in secret_names(app_name)
            if name not in given and name not in environment}


def build_credentials(app_name: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """LoadCredential= of the app's secrets ``names`` (release.build_secrets), one by one: a
    build gets those and no other."""
    directory = apps.secrets_dir(app_name)
    found = []
    for name in names:
        path = directory / name
        if path.is_symlink() or not path.is_file():
            log.warning("release.build_secrets: the app %s has no secret %s (no file %s)",
                        app_name, name, path)
            continue
        found.append((f"{apps.credential(app_name)}_{name}", str(path)))
    return found


def secrets_dropin(app_name: str) -> str:
    """The drop-in that gives a unit of the app's (an instance, a worker) its secrets."""
    lines = [f"# The secrets of the app {app_name}: bluegreen writes this before it starts the unit.",
             "[Service]"]
    lines += [f"LoadCredential={credential}:{path}" for credential, path in credentials(app_name)]
    return "\n".join(lines) + "\n"


async def give_secrets(systemd: Systemd, unit: str, app_name: str) -> None:
    """Have ``unit`` load the app's secrets from its next start on (and no other app's)."""
    await systemd.set_dropin(unit, SECRETS_DROPIN, secrets_dropin(app_name))


def take_secrets(systemd: Systemd, unit: str) -> None:
    """Drop a stopped unit's secrets drop-in: every unit name a deploy picks (a port of the
    range) would otherwise leave one behind until the next boot."""
    systemd.remove_dropin(unit, SECRETS_DROPIN)


def command(config: Config, what: str, kind: str, argv: list[str], directory: Path,
            env: Mapping[str, str]) -> Command:
    """A command run as the app: its user, environment, secrets, data and network; in a user
    namespace of its own, as the app's units are (PrivateUsers=), since every app runs as the
    same user."""
    return Command(
        what=what, kind=kind, argv=[WITH_SECRETS, *argv],
        directory=directory, user=APP_USER, timeout=config.release.timeout, environment=env,
        state_directories=[apps.data_state_directory(config.app_name)],
        credentials=credentials(config.app_name), private_users=True,
        network=config.app.network, tasks_max=APP_TASKS_MAX, app=config.app_name)
