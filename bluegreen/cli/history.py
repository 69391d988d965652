"""bluegreenctl history [-n N]: recent deployments, newest first."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import print_json, timestamp
from bluegreen.client import Client

NAME = "history"
HELP = "recent deployments, newest first"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--lines", type=int, default=20, metavar="N",
                        help="how many (default: 20)")


async def run(client: Client, args: argparse.Namespace) -> int:
    records = await client.deployments(args.lines)
    if args.json:
        print_json(records)
        return 0
    print(f"{'ID':>5}  {'STARTED':19}  {'STATE':13}  {'COMMIT':12}  {'TRIGGER':9}  {'PORT':>5}  REASON")
    for r in records:
        print(f"{r['id']:>5}  {timestamp(r['started_at']):19}  {r['state']:13}  {r['commit'][:12]:12}  "
              f"{r['trigger']:9}  {r['port'] or '-':>5}  {r['reason']}")
    return 0
