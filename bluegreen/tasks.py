"""The background tasks of an app's controller, supervised.

A background loop never dies silently: should a task fail (or, one meant to run for ever, end
at all) while the controller is not stopping, the daemon exits and systemd restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

from bluegreen import log as logsetup

log = logging.getLogger(__name__)


class Tasks:
    def __init__(self, app: str, fatal: asyncio.Event) -> None:
        self.app = app
        # Set when a task ended unexpectedly: one event for every app's controller (the app
        # manager's), which the daemon waits for.
        self.fatal = fatal
        self.stopping = False
        self._running: list[asyncio.Task[None]] = []

    def spawn(self, work: Coroutine[Any, Any, None], name: str, *,
              forever: bool = True) -> asyncio.Task[None]:
        """Run ``work`` in the background; ``forever``: it is a loop that must never end."""
        context = contextvars.copy_context()
        context.run(logsetup.APP.set, self.app)  # its log lines name the app
        task = asyncio.create_task(work, name=name, context=context)
        self._running.append(task)
        task.add_done_callback(lambda done: self._done(done, forever))
        return task

    def _done(self, task: asyncio.Task[None], forever: bool) -> None:
        with contextlib.suppress(ValueError):
            self._running.remove(task)
        if task.cancelled() or self.stopping:
            return
        error = task.exception()
        if error is None and not forever:
            return
        log.critical("the background task %s ended%s; exiting so that systemd restarts the "
                     "controller", task.get_name(), f": {error!r}" if error else "",
                     exc_info=error)
        self.fatal.set()

    def stop(self) -> None:
        """Cancel every task: the controller stops, so none of their ends is a failure."""
        self.stopping = True
        for task in list(self._running):
            task.cancel()
