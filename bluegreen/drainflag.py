"""The drain flag: a file that tells an instance's gunicorn to stop keeping connections alive.

The controller creates ``/run/bluegreen/instances/PORT.drain`` for the old instance right after
a switch, before its forwarder drains. The instance's pre_request hook (gunicornconf.py), or for
an ASGI app the wrapper around it (asgidrain.py, which also closes its websockets), sees it
and answers every request with ``Connection: close``: a busy keep-alive client makes its next
request on a new connection, which reaches the new release, and the old instance is soon left
with no connection. The flag goes when the instance's settings file goes, and when the instance
serves again (a switch back, or the one a restarted controller adopts).

A flag that cannot be written or removed is logged, never fatal: without it keep-alive clients
stay on the old instance until drain_timeout; with a stale one an instance still serves, without
keep-alive.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bluegreen.log import fields

log = logging.getLogger(__name__)


def path(run_dir: Path, port: int) -> Path:
    return run_dir / "instances" / f"{port}.drain"


def put(run_dir: Path, port: int) -> None:
    """The instance on ``port`` is to close each connection after its next response."""
    flag = path(run_dir, port)
    try:
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.touch(mode=0o644)
    except OSError as exc:
        log.warning("could not create %s (%s): keep-alive connections stay on port %d until "
                    "drain_timeout", flag, exc.strerror, port, extra=fields(port=port))


def clear(run_dir: Path, port: int) -> None:
    """The instance on ``port`` keeps connections alive again."""
    flag = path(run_dir, port)
    try:
        flag.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s (%s): the instance on port %d closes every connection "
                    "after one response", flag, exc.strerror, port, extra=fields(port=port))
