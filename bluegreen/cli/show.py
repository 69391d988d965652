"""bluegreenctl show ID: one deployment, with the time of each step."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import print_json, timestamp
from bluegreen.client import Client

NAME = "show"
HELP = "one deployment, with the time of each step"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="deployment id")


async def run(client: Client, args: argparse.Namespace) -> int:
    record = await client.deployment(args.id)
    if args.json:
        print_json(record)
        return 0
    for key in ("id", "state", "ref", "commit", "subject", "author", "trigger", "port",
                "previous_port", "previous_release", "failed_step", "reason"):
        print(f"{key.replace('_', ' ').capitalize() + ':':18} {record[key]}")
    print(f"{'Started:':18} {timestamp(record['started_at'])}")
    print(f"{'Finished:':18} {timestamp(record['finished_at'])}")
    for web_step in record.get("web_steps", ()):
        print(f"{'Web line step:':18} {web_step}")
    for step in record["steps"]:
        took = f"{step['finished'] - step['started']:7.3f} s" if step["finished"] else "    ..."
        print(f"  {step['step']:12} {took}")
    return 0
