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
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from bluegreen.history import History, HistoryError, State
from bluegreen.log import fields
from bluegreen.refusals import BadSignature, Busy, NotConfigured
from bluegreen.release.repository import Repository, RepositoryError, UnknownRef
from bluegreen.tasks import Tasks

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0


SEEN_HEAD = "refresher.seen_head"


class Refresher:
    def __init__(
        self,
        repository: Repository,
        interval: float,
        deploy: Callable[[str], Awaitable[object]],
        history: History,
        serving: Callable[[], str],
    ) -> None:
        self.repository = repository
        self.interval = interval
        self.deploy = deploy
        self.history = history
        self.serving = serving  # the release that serves now
        self.failures = 0
        self.last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The branch head whose deployment last reached an outcome: the refresher leaves it be.
        self.seen_head = history.get_value(SEEN_HEAD)

    def see(self, head: str) -> None:
        """A deployment of ``head`` reached an outcome: leave it be from now on."""
        self.seen_head = head
        try:
            self.history.set_value(SEEN_HEAD, head)
        except HistoryError as exc:
            log.error("%s; the refresher may deploy %s again", exc, head[:12])

    def forget_interrupted(self) -> None:
        """A head whose newest deployment was interrupted has no outcome yet: deploy it again."""
        if not self.seen_head:
            return
        newest = self.history.newest_of(self.seen_head)
        if newest is not None and newest.state == State.INTERRUPTED:
            self.seen_head = None

    def watch(self, wanted: bool, tasks: Tasks) -> None:
        """Run the refresher's loop when ``wanted``, and only then."""
        running = self._task is not None and not self._task.done()
        if wanted and not running:
            self._task = tasks.spawn(self.run(), "refresher")
        elif running and not wanted:
            assert self._task is not None
            self._task.cancel()
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None

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
        if head == self.seen_head:
            return None
        if head == self.serving():
            self.see(head)
            return None
        try:
            await self.deploy(head)
        except Busy:
            log.info("new commit %s waits for the running deployment", head[:12])
            return None
        except (UnknownRef, NotConfigured, HistoryError) as exc:
            # The refresher's loop never dies: it tries again at the next poll (the head is
            # not seen: no deployment of it has ended).
            log.error("the refresher cannot deploy %s: %s", head[:12], exc)
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


def check_signature(secret: str, payload: bytes, signature: str) -> None:
    """A push webhook's HMAC-SHA256 signature (X-Hub-Signature-256); raises BadSignature."""
    if not secret:
        raise BadSignature("no webhook secret is configured (credential webhook-secret)")
    expected = "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise BadSignature("the signature does not match the webhook secret")
