"""bluegreenctl reload: read bluegreen.toml again (what ExecReload= of bluegreen.service runs)."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import print_json
from bluegreen.client import Client

NAME = "reload"
HELP = "read the configuration file again; a broken one is refused and changes nothing"


def arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(client: Client, args: argparse.Namespace) -> int:
    changes = await client.reload()
    if args.json:
        print_json(changes)
        return 0
    if not changes:
        print("No setting changed.")
    for change in changes:
        print(f"{change['key']}: applies {change['applies']}")
    return 0
