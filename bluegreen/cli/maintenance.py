"""bluegreenctl maintenance on|off: the front answers the app's domains with a 503 page."""

from __future__ import annotations

import argparse
import sys

from bluegreen.cli.common import print_json
from bluegreen.client import Client

NAME = "maintenance"
HELP = ("answer every request for the app's domains with a 503 maintenance page (on), or "
        "serve them again (off); the app itself, its port and health checks are untouched")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=("on", "off", "status"), default="status",
                        help="turn maintenance on or off, or show whether it is on (default)")
    parser.add_argument("--message", default="", metavar="TEXT",
                        help="what the page says (with on; default: a short notice)")


async def run(client: Client, args: argparse.Namespace) -> int:
    if args.mode != "status":
        await client.set_maintenance(args.mode == "on", args.message)
    elif args.message:
        print("bluegreenctl: --message goes with 'maintenance on'", file=sys.stderr)
        return 2
    status = await client.status()
    if args.json:
        print_json({"maintenance": status["Maintenance"], "message": status["MaintenanceMessage"]})
    elif status["Maintenance"]:
        print(f"Maintenance is on: the front answers 503 with \"{status['MaintenanceMessage']}\".")
    else:
        print("Maintenance is off.")
    return 0
