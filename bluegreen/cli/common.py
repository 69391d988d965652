"""What the verbs share: the exit status of an error, time formatting, JSON, following a deployment."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bluegreen.api.names import EXIT_FAILED
from bluegreen.client import ApiError, Client


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


async def follow(client: Client, start: Callable[[], Awaitable[str]], as_json: bool) -> int:
    """Start a deployment, show each step as it happens, and return the exit status."""
    started = time.monotonic()

    async def begin() -> str:
        deployment_id = await start()
        if not as_json:
            record = await client.deployment(deployment_id)
            print(f"Deployment {deployment_id}: {record['commit'][:12]} {record['subject']!r} "
                  f"({record['trigger']}, {record['ref']})", flush=True)
        return deployment_id

    def on_step(step: str, release: str, port: int) -> None:
        if not as_json:
            where = f" (port {port})" if port else ""
            print(f"  {time.monotonic() - started:6.2f}s  {step}{where}", flush=True)

    record = await client.follow(begin, on_step)
    if as_json:
        print_json(record)
    else:
        print(describe_end(record))
    return 0 if record["state"] == "succeeded" else EXIT_FAILED
