"""bluegreenctl apps: the apps this host runs, and what serves each."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import print_json
from bluegreen.client import Client

NAME = "apps"
HELP = "the apps (bluegreen.toml's default app, /etc/bluegreen/apps/NAME.toml) and what serves each"


def arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(client: Client, args: argparse.Namespace) -> int:
    found = [{"name": name, "state": status["State"], "public_port": status["PublicPort"],
              "release": status["ActiveRelease"] or None, "repository": status["Repository"]}
             for name, status in (await client.app_statuses()).items()]
    if args.json:
        print_json(found)
        return 0
    print(f"{'APP':<16} {'STATE':<10} {'PORT':>5}  {'RELEASE':<12}  REPOSITORY")
    for app in found:
        print(f"{app['name']:<16} {app['state']:<10} {app['public_port']:>5}  "
              f"{(app['release'] or '-')[:12]:<12}  {app['repository'] or '-'}")
    return 0
