"""What every process of the app gets, whichever unit runs it (an instance, a worker, the
import check, the release phase): its user, its settings, its secrets, its data directory, its
Python environment and its network.

- the user ``bluegreen-app`` (from sysusers.d), the same for every release, so that files in
  the data directory outlive releases;
- the settings of ``[app.environment]`` and bluegreen's own ``BLUEGREEN_*`` variables, in the
  unit's environment;
- the secrets, never in any unit's environment or on disk outside /etc/bluegreen/secrets:
  systemd loads the directory as credentials (``LoadCredential=secrets:/etc/bluegreen/secrets``)
  and ``with-secrets`` exports the app's own (BLUEGREEN_APP: the default app's files, or those
  of its subdirectory NAME) as the process starts;
- the data directory /var/lib/bluegreen/data (``StateDirectory=bluegreen/data``, mode 0700),
  /var/lib/bluegreen/app-data/NAME for the app NAME (see apps.py);
- the release's Python environment first on ``PATH``.

The unit files bluegreen-app@.service and bluegreen-worker@.service say the same in their own
words; this module says it for transient units and for the files those units read.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from bluegreen import apps
from bluegreen.config import DEFAULT_APP, Config, ConfigError
from bluegreen.environments import SYSTEM_PYTHON
from bluegreen.transient import Command

APP_USER = "bluegreen-app"
SECRETS_DIR = apps.SECRETS_DIR
WITH_SECRETS = "/usr/libexec/bluegreen/with-secrets"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Tasks the app's user may own when a command of the app starts more: its serving instances
# and workers (a process, or a thread, each) count too.
APP_TASKS_MAX = 4096


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
    # An app's units load its secrets directory with its subdirectories: every other app's
    # for the default app, those of an app named like this one plus "_..." for the others.
    # with-secrets leaves those out.
    values["BLUEGREEN_OTHER_APPS"] = " ".join(name for name in other_apps() if name != config.app_name)
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


def other_apps() -> list[str]:
    """The names under which an app's units may find other apps' secrets: the app files', and
    the secrets directory's subdirectories."""
    names: set[str] = set()
    with contextlib.suppress(ConfigError):
        names.update(apps.files())
    with contextlib.suppress(OSError):
        names.update(path.name for path in SECRETS_DIR.iterdir() if path.is_dir())
    return sorted(names)


def credentials(app_name: str = DEFAULT_APP) -> list[tuple[str, str]]:
    """LoadCredential= of the app's secrets (none while the directory is missing)."""
    directory = apps.secrets_dir(app_name)
    return [(apps.credential(app_name), str(directory))] if directory.is_dir() else []


def command(config: Config, what: str, kind: str, argv: list[str], directory: Path,
            env: Mapping[str, str]) -> Command:
    """A command run as the app: its user, environment, secrets, data and network."""
    return Command(
        what=what, kind=kind, argv=[WITH_SECRETS, *argv],
        directory=directory, user=APP_USER, timeout=config.release.timeout, environment=env,
        state_directories=[apps.data_state_directory(config.app_name)],
        credentials=credentials(config.app_name),
        network=config.app.network, tasks_max=APP_TASKS_MAX, app=config.app_name)
