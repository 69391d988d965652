"""bluegreenctl: a thin client of the daemon's D-Bus API.

Exit status: 0 success, 1 the deployment or call failed, 2 bad usage or argument,
4 no such deployment, 5 another deployment is running, 6 bluegreen is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bluegreen.client import ApiError, Client

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_SUCH = 4
EXIT_BUSY = 5
EXIT_NOT_RUNNING = 6

_EXIT_FOR_ERROR = {
    "InvalidRef": EXIT_USAGE,
    "UnknownRef": EXIT_USAGE,
    "NoSuchDeployment": EXIT_NO_SUCH,
    "Busy": EXIT_BUSY,
    "ServiceUnknown": EXIT_NOT_RUNNING,
    "NameHasNoOwner": EXIT_NOT_RUNNING,
}


def _time(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


async def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = await client.status()
    if args.json:
        status["Instances"] = await client.instances()
        _print_json(status)
        return 0
    release = status["ActiveRelease"]
    print(f"State:       {status['State']}")
    print(f"Serving:     {release[:12] if release else '(nothing)'}"
          + (f" on port {status['ActivePort']} via port {status['PublicPort']}" if release else ""))
    print(f"Health:      {'healthy' if status['Healthy'] else 'unhealthy'}: {status['HealthReason']}")
    print(f"Repository:  {status['Repository'] or '(not configured)'} ({status['Branch']})")
    if status["CurrentDeployment"]:
        print(f"Deploying:   deployment {status['CurrentDeployment']}")
    if status["LastDeployment"]:
        last = await client.deployment(status["LastDeployment"])
        print(f"Last:        deployment {last['id']} {last['state']} at {_time(last['finished_at'])}"
              f" ({last['commit'][:12]} {last['subject']})")
    for instance in await client.instances():
        print(f"Instance:    port {instance['port']} {instance['state']} {instance['release'][:12]}")
    return 0


def _describe_end(record: dict[str, Any]) -> str:
    took = f"{record['duration']:.1f} s" if record["duration"] is not None else "?"
    if record["state"] == "succeeded":
        return (f"Deployment {record['id']} succeeded in {took}: {record['commit'][:12]} serves on "
                f"port {record['port']}.")
    return (f"Deployment {record['id']} {record['state']} at step {record['failed_step'] or '?'} "
            f"after {took}: {record['reason']}")


async def cmd_deploy(client: Client, args: argparse.Namespace) -> int:
    if args.no_wait:
        print(await client.deploy(args.ref, trigger="cli"))
        return 0
    started = time.monotonic()

    async def start() -> str:
        deployment_id = await client.deploy(args.ref, trigger="cli")
        if not args.json:
            record = await client.deployment(deployment_id)
            print(f"Deployment {deployment_id}: {record['commit'][:12]} {record['subject']!r} "
                  f"({record['ref']})", flush=True)
        return deployment_id

    def on_step(step: str, release: str, port: int) -> None:
        if not args.json:
            where = f" (port {port})" if port else ""
            print(f"  {time.monotonic() - started:6.2f}s  {step}{where}", flush=True)

    record = await client.follow(start, on_step)
    if args.json:
        _print_json(record)
    else:
        print(_describe_end(record))
    return 0 if record["state"] == "succeeded" else EXIT_FAILED


async def cmd_history(client: Client, args: argparse.Namespace) -> int:
    records = await client.deployments(args.lines)
    if args.json:
        _print_json(records)
        return 0
    print(f"{'ID':>5}  {'STARTED':19}  {'STATE':11}  {'COMMIT':12}  {'TRIGGER':9}  {'PORT':>5}  REASON")
    for r in records:
        print(f"{r['id']:>5}  {_time(r['started_at']):19}  {r['state']:11}  {r['commit'][:12]:12}  "
              f"{r['trigger']:9}  {r['port'] or '-':>5}  {r['reason']}")
    return 0


async def cmd_show(client: Client, args: argparse.Namespace) -> int:
    record = await client.deployment(args.id)
    if args.json:
        _print_json(record)
        return 0
    for key in ("id", "state", "ref", "commit", "subject", "author", "trigger", "port",
                "previous_port", "previous_release", "failed_step", "reason"):
        print(f"{key.replace('_', ' ').capitalize() + ':':18} {record[key]}")
    print(f"{'Started:':18} {_time(record['started_at'])}")
    print(f"{'Finished:':18} {_time(record['finished_at'])}")
    for step in record["steps"]:
        took = (step["finished"] - step["started"]) if step["finished"] else None
        print(f"  {step['step']:12} {took:7.3f} s" if took is not None else f"  {step['step']:12} ...")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="bluegreenctl",
        description="Control bluegreen, the blue-green deployment service.",
        epilog="Exit status: 0 success, 1 failure, 2 bad usage or ref, 4 no such deployment, "
               "5 another deployment is running, 6 bluegreen is not running.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    verbs = top.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    verb = verbs.add_parser("status", parents=[common], help="what serves, and how healthy it is")
    verb.set_defaults(handler=cmd_status)

    verb = verbs.add_parser("deploy", parents=[common],
                            help="deploy a branch, tag or commit and show each step")
    verb.add_argument("ref", nargs="?", default="",
                      help="branch, tag or commit (default: the configured branch's head)")
    verb.add_argument("--no-wait", action="store_true",
                      help="print the deployment id and return at once")
    verb.set_defaults(handler=cmd_deploy)

    verb = verbs.add_parser("history", parents=[common], help="recent deployments, newest first")
    verb.add_argument("-n", "--lines", type=int, default=20, metavar="N",
                      help="how many (default: 20)")
    verb.set_defaults(handler=cmd_history)

    verb = verbs.add_parser("show", parents=[common], help="one deployment, with its step times")
    verb.add_argument("id", help="deployment id")
    verb.set_defaults(handler=cmd_show)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    async def run() -> int:
        try:
            client = await Client.connect()
        except OSError as exc:
            print(f"bluegreenctl: cannot reach the system bus: {exc}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        try:
            return int(await args.handler(client, args))
        except ApiError as exc:
            print(f"bluegreenctl: {exc.message}", file=sys.stderr)
            return _EXIT_FOR_ERROR.get(exc.short_name, EXIT_FAILED)
        finally:
            client.close()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
