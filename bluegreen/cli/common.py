"""What the verbs share: the exit status of an error, time formatting, JSON, following a deployment."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bluegreen.api.names import EXIT_FAILED
from bluegreen.client import ApiError, Client
from bluegreen.config import share_text

# While a followed deployment is at its canary step (as DeploymentStep names it), the Canary
# property is read every CANARY_POLL seconds; a line shows it when its answers changed, at
# most every CANARY_EVERY seconds, and after CANARY_QUIET seconds without one (the time goes by).
CANARY_STEP = "canary"
CANARY_POLL = 1.0
CANARY_EVERY = 2.0
CANARY_QUIET = 30.0
_ANSWERS = ("canary_requests", "canary_errors", "stable_requests", "stable_errors")


def exit_status_for(error: ApiError) -> int:
    return error.error.exit_status if error.error else EXIT_FAILED


def timestamp(value: float | None) -> str:
    if not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def describe_end(record: dict[str, Any]) -> str:
    took = f"{record['duration']:.1f} s" if record["duration"] is not None else "?"
    if record["state"] == "succeeded":
        return (f"Deployment {record['id']} succeeded in {took}: {record['commit'][:12]} serves on "
                f"port {record['port']}.")
    return (f"Deployment {record['id']} {record['state']} at step {record['failed_step'] or '?'} "
            f"after {took}: {record['reason']}")


def error_rate(errors: int, requests: int) -> str:
    return f"{errors / requests if requests else 0.0:.1%}"


def canary_progress(reading: dict[str, Any]) -> str:
    """One line for a reading of the Canary property."""
    return (f"canary: {reading['measured_share']:.1%} of answers ({share_text(reading['share'])} "
            f"asked); new {reading['canary_errors']}/{reading['canary_requests']} 5xx "
            f"({error_rate(reading['canary_errors'], reading['canary_requests'])}), "
            f"old {reading['stable_errors']}/{reading['stable_requests']} "
            f"({error_rate(reading['stable_errors'], reading['stable_requests'])}); "
            f"{reading['elapsed']:.0f}/{reading['duration']:.0f} s")


class CanaryProgress:
    """Which readings of a canary are worth a line while a deployment is followed: the first,
    then one whose answers changed (CANARY_EVERY apart at most), or any after CANARY_QUIET."""

    def __init__(self) -> None:
        self.shown: tuple[int, ...] | None = None
        self.at = 0.0

    def line(self, reading: dict[str, Any]) -> str | None:
        if not reading:  # none runs (yet, or any more)
            return None
        answers, now = tuple(reading[name] for name in _ANSWERS), time.monotonic()
        if self.shown is None or now - self.at >= CANARY_QUIET or \
                (answers != self.shown and now - self.at >= CANARY_EVERY):
            self.shown, self.at = answers, now
            return canary_progress(reading)
        return None


async def follow(client: Client, start: Callable[[], Awaitable[str]], as_json: bool) -> int:
    """Start a deployment, show each step as it happens, and return the exit status."""
    started = time.monotonic()
    at = ""  # the step the deployment is at

    async def begin() -> str:
        deployment_id = await start()
        if not as_json:
            record = await client.deployment(deployment_id)
            print(f"Deployment {deployment_id}: {record['commit'][:12]} {record['subject']!r} "
                  f"({record['trigger']}, {record['ref']})", flush=True)
        return deployment_id

    def on_step(step: str, release: str, port: int) -> None:
        nonlocal at
        at = step
        if not as_json:
            where = f" (port {port})" if port else ""
            print(f"  {time.monotonic() - started:6.2f}s  {step}{where}", flush=True)

    async def show_canary() -> None:
        progress = CanaryProgress()
        while True:
            await asyncio.sleep(CANARY_POLL)
            if at != CANARY_STEP:
                continue
            try:
                line = progress.line(await client.canary())
            except ApiError:
                return  # a daemon without the Canary property: its steps will do
            if line:
                print(f"  {line}", flush=True)

    shown = None if as_json else asyncio.ensure_future(show_canary())
    try:
        record = await client.follow(begin, on_step)
    finally:
        if shown is not None:
            shown.cancel()
    if as_json:
        print_json(record)
    else:
        print(describe_end(record))
    return 0 if record["state"] == "succeeded" else EXIT_FAILED
