"""What the verbs share: exit statuses, time formatting, JSON, following a deployment."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bluegreen.client import ApiError, Client

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_CONFIGURATION = 3
EXIT_NO_SUCH = 4
EXIT_BUSY = 5
EXIT_NOT_RUNNING = 6

_EXIT_FOR_ERROR = {
    "InvalidRef": EXIT_USAGE,
    "UnknownRef": EXIT_USAGE,
    "NoRollbackTarget": EXIT_USAGE,
    "BadConfiguration": EXIT_BAD_CONFIGURATION,
    "NoSuchDeployment": EXIT_NO_SUCH,
    "NoSuchApp": EXIT_NO_SUCH,
    "Busy": EXIT_BUSY,
    "ServiceUnknown": EXIT_NOT_RUNNING,
    "NameHasNoOwner": EXIT_NOT_RUNNING,
}


def exit_status_for(error: ApiError) -> int:
    return _EXIT_FOR_ERROR.get(error.short_name, EXIT_FAILED)


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
