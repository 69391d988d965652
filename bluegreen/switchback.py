"""The record of a switch-back under way: which deployment's instances are being retired.

A switch-back starts the old release's forwarders again, then drains the new release's, which
can take drain_timeout. A controller that dies meanwhile leaves both releases with a forwarder,
the new one the newer deployment: reconciliation would keep the release the switch-back was
leaving. So the deploy writes this record before the switch-back acts, and reconciliation
(reconcile.py) keeps the old release while it reads one. It lives under /run, as the units do,
one per app (deployment ids are the app's own), and goes once the switch-back is over or
reconciliation has settled what serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bluegreen.config import DEFAULT_APP
from bluegreen.files import atomic_write, environment_file, read_environment_file

log = logging.getLogger(__name__)


def path(run_dir: Path, app: str = DEFAULT_APP) -> Path:
    return run_dir / "switch-back" / f"{app}.env"


def record(run_dir: Path, app: str, deployment_id: int) -> None:
    """The instances of ``deployment_id`` are being retired for the release before them.

    Never raises: a switch-back goes on without its record (a controller that dies during it
    may then keep the new release)."""
    try:
        atomic_write(path(run_dir, app), environment_file({"BLUEGREEN_DEPLOYMENT_ID": str(deployment_id)}))
    except OSError as exc:
        log.error("could not record the switch-back of deployment %d (%s): should the controller "
                  "stop before it ends, it may keep the new release", deployment_id, exc)


def retiring(run_dir: Path, app: str = DEFAULT_APP) -> int:
    """The deployment a switch-back under way retires (0: none)."""
    try:
        value = read_environment_file(path(run_dir, app)).get("BLUEGREEN_DEPLOYMENT_ID", "")
    except OSError as exc:
        log.error("cannot read %s: %s", path(run_dir, app), exc)
        return 0
    return int(value) if value.isdigit() else 0


def clear(run_dir: Path, app: str = DEFAULT_APP) -> None:
    try:
        path(run_dir, app).unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot remove %s: %s", path(run_dir, app), exc)
