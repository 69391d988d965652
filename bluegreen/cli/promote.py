"""bluegreenctl promote: end the canary under way early with a promotion."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import print_json
from bluegreen.client import Client

NAME = "promote"
HELP = "promote the canary under way now (the switch, drain and watch follow)"


def arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(client: Client, args: argparse.Namespace) -> int:
    deployment_id = await client.promote()  # NoCanary when none runs: exit status 1
    if args.json:
        print_json({"id": deployment_id, "promoted": True})
    else:
        print(f"Deployment {deployment_id}: canary promoted; the switch, drain and watch follow "
              f"(bluegreenctl show {deployment_id}).")
    return 0
