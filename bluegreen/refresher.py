"""The code refresher: deploys each new commit of the watched branch.

Every ``repository.poll_interval`` seconds (or at once when woken by a push webhook) it asks
the remote for the branch head with ``git ls-remote``: one round trip, no checkout. A head it
has not seen before is handed to the controller; a head it has seen (one whose deployment
reached an outcome: the controller says which) is left alone, so a commit that failed to
deploy is not retried until a new one arrives (or someone asks), and a manual rollback is not
undone. A deployment that was interrupted (the controller stopped) has no outcome: its head
is deployed again. Errors reaching the remote are logged and retried with an
exponential backoff; they never touch what serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bluegreen.log import fields
from bluegreen.release.repository import Repository, RepositoryError

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0


class Busy(Exception):
    """Raised by the deploy callback when another deployment runs: try again later."""


class Refresher:
    def __init__(
        self,
        repository: Repository,
        interval: float,
        deploy: Callable[[str], Awaitable[None]],
        load_seen: Callable[[], str | None],
    ) -> None:
        self.repository = repository
        self.interval = interval
        self.deploy = deploy
        self.load_seen = load_seen
        self.failures = 0
        self.last_error = ""
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Poll now (a push webhook, or someone asked)."""
        self._wake.set()

    def delay(self) -> float:
        if self.failures == 0:
            return self.interval
        backoff: float = self.interval * 2.0 ** self.failures
        return min(backoff, max(MAX_BACKOFF, self.interval))

    async def run(self) -> None:
        while True:
            await self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.delay())
            self._wake.clear()

    async def poll(self) -> str | None:
        """Look at the remote once; return the head if a deployment of it was started."""
        try:
            head = await self.repository.remote_head()
        except RepositoryError as exc:
            self.failed(exc)
            return None
        if self.failures:
            log.info("%s answers again after %d failed attempts", self.repository.public_url,
                     self.failures)
            self.failures, self.last_error = 0, ""
        if head is None:
            log.warning("branch %s does not exist in %s", self.repository.branch,
                        self.repository.public_url)
            return None
        if head == self.load_seen():
            return None
        try:
            await self.deploy(head)
        except Busy:
            log.info("new commit %s waits for the running deployment", head[:12])
            return None
        except RepositoryError as exc:  # the fetch failed: the commit is not seen yet
            self.failed(exc)
            return None
        return head

    def failed(self, exc: RepositoryError) -> None:
        self.failures += 1
        self.last_error = str(exc)
        log.warning("cannot read %s (attempt %d, next in %.0f s): %s", self.repository.public_url,
                    self.failures, self.delay(), exc,
                    extra=fields(repository=self.repository.public_url))
