"""Why the controller refuses a request: raised by the controller, caught by the D-Bus API
(which names each for its clients) and by the controller's own callers, the refresher and
recovery."""

from __future__ import annotations


class Busy(Exception):
    """A deployment is already running; the message names it."""


class NotConfigured(Exception):
    pass


class NoCanary(Exception):
    """A promotion asked while no canary runs."""


class NoRollbackTarget(Exception):
    """The rollback target names no deployment or release on disk."""


class BadSignature(Exception):
    pass
