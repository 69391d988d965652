"""gunicorn settings for app instances: ``gunicorn -c python:bluegreen.gunicornconf ...``.

It sets two hooks. ``post_request`` counts each answer by status class and duration
(answers.py), for /metrics and a canary's analysis. ``pre_request`` notes when the request
began and, once the file named by ``BLUEGREEN_DRAIN_FILE``
exists (the controller creates it for the old instance right after a switch), every response
carries ``Connection: close`` and gunicorn closes the connection after it: a keep-alive client
makes its next request on a new connection, which reaches the new release. Without it a busy
keep-alive client would stay on the old instance until drain_timeout and then be cut. An
application's own ``Connection: close`` cannot do this: gunicorn drops hop-by-hop headers.
Connections idle in the keep-alive poller are not read again until a request comes; gunicorn
closes them once ``--keep-alive`` seconds (2 by default) have passed since their last response.

How the close is asked for, by gunicorn version (the gthread worker; sync never keeps alive):
- ``req.force_close()``: in gunicorn 22 and 23, and in Debian's 20.1 (its CVE-2024-1135 fix);
- otherwise (gunicorn 20.1 and 21 from PyPI) the worker's ``keepalive`` setting is 0 while the
  file exists, which gthread and the async workers turn into the same ``Connection: close``.

uvicorn's worker (ASGI apps) never calls the hook: asgidrain.py does the same there.

With forwarder = "direct", ``BLUEGREEN_WORKER_CONNECTIONS`` is the instance's share of
ports.max_connections per worker (forwarders/direct.py), gunicorn's ``worker_connections``:
there is no forwarder to count them.

The check is one access(2) per request, about 1 us. Nothing else is set, so the command line
and GUNICORN_CMD_ARGS decide every other setting (and override these); importing the module
only reads the environment.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bluegreen import answers

_drain_file = os.environ.get("BLUEGREEN_DRAIN_FILE", "")
_worker_connections = os.environ.get("BLUEGREEN_WORKER_CONNECTIONS", "")
if _worker_connections.isdigit() and int(_worker_connections) > 0:
    worker_connections = int(_worker_connections)
# The keepalive setting the worker had before a drain turned it to 0 (the fallback only).
_configured: dict[str, int] = {}


def draining() -> bool:
    """Whether this instance is to stop keeping connections alive."""
    return bool(_drain_file) and os.access(_drain_file, os.F_OK)


def pre_request(worker: Any, req: Any) -> None:
    req.bluegreen_started = time.monotonic()
    worker.log.debug("%s %s", req.method, req.path)  # what gunicorn's default hook does
    drain = draining()
    force_close = getattr(req, "force_close", None)
    if force_close is not None:
        if drain:
            force_close()
        return
    _keepalive_off(worker.cfg, drain)


def _keepalive_off(cfg: Any, off: bool) -> None:
    """Turn the worker's keepalive setting to 0 while ``off``, back to its value after.

    Called from several threads at once: it only ever writes the configured value or 0."""
    if off and cfg.keepalive:
        _configured["keepalive"] = cfg.keepalive
        cfg.set("keepalive", 0)
    elif not off and not cfg.keepalive and "keepalive" in _configured:
        cfg.set("keepalive", _configured["keepalive"])


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Count the answer: its status (none: the app failed, and gunicorn answers 500) and how
    long it took. gunicorn calls it whether the app returned or raised. bluegreen's own
    health checks are not counted."""
    if ("USER-AGENT", answers.HEALTH_AGENT) in getattr(req, "headers", ()):
        return
    started = getattr(req, "bluegreen_started", None)
    elapsed = time.monotonic() - started if started is not None else 0.0
    status = getattr(resp, "status_code", None) if resp is not None else None
    answers.record(status if isinstance(status, int) else None, elapsed)
