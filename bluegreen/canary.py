"""A canary: the new release takes a share of the new connections first, and what its answers
say promotes it or aborts it.

After the new release is healthy, the public port gives it ``share`` of new connections (the
reuseport steering program of socat, the built-in proxy and direct weighs each instance, see
forwarders/reuseport.py); the old release keeps the rest. A connection stays with the release
it reached: a keep-alive client keeps its release for the connection's life. Every instance
counts its answers (answers.py); this module compares the two releases' counts since the
canary began:

- **abort** once the new release has at least ``min_requests`` answers and its share of 5xx
  exceeds the old release's by more than ``max_error_rate``: traffic goes back to the old
  release, the canary's requests in flight finish, it stops;
- **promote** at the end of ``duration`` (the usual switch, drain and watch follow), or when an
  operator asks (``bluegreenctl promote``); below ``min_requests`` answers by then, the
  decision counts only what the health checks said, and the record says so.

The deploy flow (deploy.py) starts and ends a canary; ``Analysis`` runs it in between, and the
rest of this module is its arithmetic, kept pure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from bluegreen import answers
from bluegreen.answers import Answers
from bluegreen.config import CanaryConfig, share_text

# The steering program's weights add up to this: a share is kept to a thousandth.
SCALE = 1000


@dataclass(frozen=True)
class Side:
    """One release's answers since the canary began."""

    requests: int = 0
    errors: int = 0

    @classmethod
    def since(cls, now: Answers, before: Answers) -> Side:
        return cls(max(0, now.count - before.count), max(0, now.errors - before.errors))

    @property
    def rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def describe(self) -> str:
        return f"{self.errors} of {self.requests} answers 5xx ({self.rate:.1%})"


@dataclass(frozen=True)
class Reading:
    """Where a canary stands: the share asked, both releases' answers, the time it has run."""

    share: float
    canary: Side
    stable: Side
    elapsed: float
    duration: float

    @property
    def measured_share(self) -> float:
        """The new release's share of the answers both gave (0 before any)."""
        total = self.canary.requests + self.stable.requests
        return self.canary.requests / total if total else 0.0

    @property
    def excess(self) -> float:
        """How far the new release's error rate exceeds the old one's."""
        return self.canary.rate - self.stable.rate

    def describe(self) -> str:
        return (f"new release: {self.canary.describe()}; old release: {self.stable.describe()}; "
                f"the new release gave {self.measured_share:.1%} of the answers "
                f"({share_text(self.share)} asked) in {self.elapsed:.1f} s")

    def to_dict(self) -> dict[str, float | int]:
        return {"share": self.share, "measured_share": self.measured_share,
                "canary_requests": self.canary.requests, "canary_errors": self.canary.errors,
                "stable_requests": self.stable.requests, "stable_errors": self.stable.errors,
                "elapsed": self.elapsed, "duration": self.duration}


class Verdict(StrEnum):
    PROMOTE = "promote"
    ABORT = "abort"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def decide(reading: Reading, settings: CanaryConfig) -> Decision | None:
    """What the answers decide now: an abort as soon as they do, a promotion once the canary
    has run its ``duration``; None to go on."""
    enough = reading.canary.requests >= settings.min_requests
    if enough and reading.excess > settings.max_error_rate:
        return Decision(Verdict.ABORT, (
            f"the new release's error rate exceeds the old one's by {reading.excess:.1%} "
            f"(canary.max_error_rate is {settings.max_error_rate:.1%}): {reading.describe()}"))
    if reading.elapsed < reading.duration:
        return None
    if not enough:
        return Decision(Verdict.PROMOTE, (
            f"canary promoted on its health checks alone: {reading.canary.requests} answers "
            f"are fewer than canary.min_requests ({settings.min_requests}); "
            f"{reading.describe()}"))
    return Decision(Verdict.PROMOTE, f"canary promoted: {reading.describe()}")


def weights(new: Sequence[int], old: Sequence[int], share: float) -> dict[int, int]:
    """Each instance's weight in the steering program: ``share`` of SCALE split among the new
    instances, the rest among the old ones; never 0 for an instance that is to receive."""
    new_each = max(1, round(SCALE * share / len(new)))
    old_each = max(1, round(SCALE * (1 - share) / len(old))) if old else 0
    return {**dict.fromkeys(old, old_each), **dict.fromkeys(new, new_each)}


def answered(ports: Sequence[int]) -> Answers:
    """What the instances on ``ports`` answered since they started, summed."""
    return sum((answers.read(port) for port in ports), Answers())


Trouble = Callable[[], Awaitable[str | None]]


@dataclass
class Analysis:
    """The canary under way, if any: ``reading`` says where it stands (None: none runs), and an
    operator may ``promote`` it early."""

    reading: Reading | None = None
    promote_asked: asyncio.Event = field(default_factory=asyncio.Event)
    promote_reason: str = ""

    def promote(self, reason: str) -> bool:
        """An operator's promotion of the canary under way; False when none runs."""
        if self.reading is None:
            return False
        self.promote_reason = reason
        self.promote_asked.set()
        return True

    async def run(self, new_ports: Sequence[int], old_ports: Sequence[int],
                  before: tuple[Answers, Answers], share: float, settings: CanaryConfig,
                  interval: float, trouble: Trouble, rollback: asyncio.Event,
                  rollback_reason: Callable[[], str], started: float | None = None,
                  stable_trouble: Trouble | None = None) -> Decision:
        """Read both releases' answers since ``before`` and the new one's ``trouble`` (its
        health) every ``interval`` seconds (at most 0.5) until they decide, or an operator
        does: a promotion, or a ``rollback`` (an abort). The canary's time runs from
        ``started`` (time.monotonic(); None: now), when new connections began to reach it.
        Should the old release fail (``stable_trouble``), the new one, healthy, is promoted:
        there is nothing to go back to."""
        started = time.monotonic() if started is None else started
        self.promote_asked.clear()
        try:
            while True:
                reading = self.reading = Reading(
                    share, Side.since(answered(new_ports), before[0]),
                    Side.since(answered(old_ports), before[1]), time.monotonic() - started,
                    settings.duration)
                if rollback.is_set():
                    return Decision(Verdict.ABORT, f"{rollback_reason()}; {reading.describe()}")
                if self.promote_asked.is_set():
                    return Decision(Verdict.PROMOTE, f"{self.promote_reason}; {reading.describe()}")
                unhealthy = await trouble()
                if unhealthy:
                    return Decision(Verdict.ABORT, f"unhealthy during the canary ({unhealthy}); "
                                                   f"{reading.describe()}")
                gone = await stable_trouble() if stable_trouble is not None else None
                if gone:
                    return Decision(Verdict.PROMOTE, f"canary promoted early: the old release "
                                                     f"failed ({gone}); {reading.describe()}")
                decision = decide(reading, settings)
                if decision is not None:
                    return decision
                await _either(rollback, self.promote_asked,
                              min(interval, 0.5, max(0.01, reading.duration - reading.elapsed)))
        finally:
            self.reading = None


async def _either(first: asyncio.Event, second: asyncio.Event, timeout: float) -> None:
    """Wait ``timeout`` seconds, less if either event is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in (first, second)]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
