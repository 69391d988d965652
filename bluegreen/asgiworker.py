"""gunicorn's worker class for ASGI apps: ``--worker-class bluegreen.asgiworker.UvicornWorker``.
Runs inside the instance's gunicorn, in the release's Python environment.

It is uvicorn's own worker, from the release's environment: the ``uvicorn-worker`` package's
``uvicorn_worker.UvicornWorker`` if the release pins it, else ``uvicorn.workers.UvicornWorker``
(deprecated since uvicorn 0.30, still there). The app it loads is wrapped in the drain flag
(asgidrain.py), since gunicorn's pre_request hook never runs for this worker. uvicorn runs the
app's lifespan startup before the worker accepts its first connection, so no request (the
health checks included) reaches an app whose startup has not completed; a startup that fails
ends the worker with gunicorn's "worker failed to boot", and the instance with it (with
status 3, or 1 when a second worker fails while gunicorn halts for the first: systemd then
restarts it, and the deploy counts that restart as the failure, instances.boot_failure).
"""

from __future__ import annotations

import os
import warnings

from bluegreen.asgidrain import Drain

try:
    from uvicorn_worker import UvicornWorker as _Uvicorn
except ImportError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from uvicorn.workers import UvicornWorker as _Uvicorn


class UvicornWorker(_Uvicorn):  # type: ignore[misc]
    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = Drain(getattr(self, "wsgi"), os.environ.get("BLUEGREEN_DRAIN_FILE"))  # noqa: B009
