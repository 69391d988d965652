"""bluegreenctl deploy [REF]: deploy a branch, tag or commit, showing each step."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import follow
from bluegreen.client import Client

NAME = "deploy"
HELP = "deploy a branch, tag or commit and show each step"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", nargs="?", default="",
                        help="branch, tag or commit (default: the configured branch's head)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the deployment id and return at once")
    parser.add_argument("--wait", action="store_true",
                        help="if another deployment is running, wait until it ends, then go "
                             "(instead of exit status 5)")


async def run(client: Client, args: argparse.Namespace) -> int:
    if args.no_wait:
        print(await client.deploy(args.ref, trigger="cli", wait=args.wait))
        return 0
    return await follow(client, lambda: client.deploy(args.ref, trigger="cli", wait=args.wait), args.json)
