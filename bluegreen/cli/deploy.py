"""bluegreenctl deploy [REF]: deploy a branch, tag or commit, showing each step."""

from __future__ import annotations

import argparse
from typing import Any

from bluegreen.cli.common import follow
from bluegreen.client import Client
from bluegreen.config import parse_share

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
    parser.add_argument("--canary", type=share, metavar="SHARE",
                        help="first give the new release SHARE of new connections (\"25%%\" or "
                             "0.25; 0: none) and compare its answers with the old release's "
                             "(default: canary.share)")


def share(value: str) -> float:
    try:
        return parse_share(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def run(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"trigger": "cli", "wait": args.wait, "canary": args.canary}
    if args.no_wait:
        print(await client.deploy(args.ref, **options))
        return 0
    return await follow(client, lambda: client.deploy(args.ref, **options), args.json)
