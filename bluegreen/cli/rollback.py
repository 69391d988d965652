"""bluegreenctl rollback [TARGET]: go back to an earlier release, blue-green."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable

from bluegreen.cli.common import follow
from bluegreen.client import Client

NAME = "rollback"
HELP = "deploy the previous good release (or TARGET), showing each step"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default="",
                        help="a deployment id or a commit still on disk (default: the previous "
                             "good release)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the deployment id and return at once")
    parser.add_argument("--wait", action="store_true",
                        help="if another deployment is running, wait until it ends, then go "
                             "(instead of exit status 5)")


async def run(client: Client, args: argparse.Namespace) -> int:
    def start() -> Awaitable[str]:
        return client.rollback(args.target, trigger="cli", wait=args.wait)

    if args.no_wait:
        print(await start())
        return 0
    return await follow(client, start, args.json)
