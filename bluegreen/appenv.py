"""What every process of the app gets, whichever unit runs it (an instance, a worker, the
import check, the release phase): its user, its settings, its secrets, its data directory, its
Python environment and its network.

- the user ``bluegreen-app`` (from sysusers.d), the same for every release, so that files in
  the data directory outlive releases;
- the settings of ``[app.environment]`` and bluegreen's own ``BLUEGREEN_*`` variables, in the
  unit's environment;
- the secrets, never in any unit's environment or on disk outside /etc/bluegreen/secrets:
  systemd loads the directory as credentials (``LoadCredential=secrets:/etc/bluegreen/secrets``)
  and ``with-secrets`` exports them as the process starts;
- the data directory /var/lib/bluegreen/data (``StateDirectory=bluegreen/data``, mode 0700);
- the release's Python environment first on ``PATH``.

The unit files bluegreen-app@.service and bluegreen-worker@.service say the same in their own
words; this module says it for transient units and for the files those units read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bluegreen.config import DATA_DIR, Config
from bluegreen.environments import SYSTEM_PYTHON
from bluegreen.transient import Command

APP_USER = "bluegreen-app"
SECRETS_DIR = Path("/etc/bluegreen/secrets")
SECRETS_CREDENTIAL = "secrets"
WITH_SECRETS = "/usr/libexec/bluegreen/with-secrets"
DATA_STATE_DIRECTORY = "bluegreen/data"
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
        "BLUEGREEN_DATA_DIR": str(DATA_DIR),
        "BLUEGREEN_PYTHON": str(python),
        "BLUEGREEN_DEPLOYMENT_ID": str(deployment_id),
    })
    return values


def credentials() -> list[tuple[str, str]]:
    """LoadCredential= of the secrets (none while the directory is missing)."""
    return [(SECRETS_CREDENTIAL, str(SECRETS_DIR))] if SECRETS_DIR.is_dir() else []


def command(config: Config, what: str, kind: str, argv: list[str], directory: Path,
            env: Mapping[str, str]) -> Command:
    """A command run as the app: its user, environment, secrets, data and network."""
    return Command(
        what=what, kind=kind, argv=[WITH_SECRETS, *argv],
        directory=directory, user=APP_USER, timeout=config.release.timeout, environment=env,
        state_directories=[DATA_STATE_DIRECTORY], credentials=credentials(),
        network=config.app.network, tasks_max=APP_TASKS_MAX)
