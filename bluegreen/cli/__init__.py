"""bluegreenctl: a thin client of the daemon's D-Bus API, one module per verb.

Exit status: 0 success, 1 the deployment or call failed, 2 bad usage or argument,
3 the configuration file is broken (reload), 4 no such deployment or app, 5 another deployment
is running, 6 bluegreen is not running. ``-a NAME`` speaks to the app NAME (default: the
default app, bluegreen.toml's).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bluegreen import apps as appnames
from bluegreen.api.names import EXIT_NOT_RUNNING
from bluegreen.cli import apps, deploy, history, logs, maintenance, promote, reload, rollback, show, status
from bluegreen.cli.common import exit_status_for
from bluegreen.client import ApiError, Client
from bluegreen.config import DEFAULT_APP

VERBS = (status, deploy, promote, rollback, history, show, logs, reload, maintenance, apps)

EPILOG = """\
exit status:
  0  success
  1  the deployment failed or was switched back (the old release serves), or the call failed
  2  bad usage, or a ref or target that names nothing
  3  the configuration file is broken (reload): nothing changed
  4  no such deployment, or no such app
  5  another deployment is running
  6  bluegreen is not running

See bluegreenctl(1), bluegreen(8) and bluegreen.toml(5)."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="bluegreenctl", description="Control bluegreen, the blue-green deployment service.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("-a", "--app", default=DEFAULT_APP, type=app_name, metavar="NAME",
                     help="the app to act on (default: %(default)s, that of bluegreen.toml)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    verbs = top.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for verb in VERBS:
        sub = verbs.add_parser(verb.NAME, parents=[common], help=verb.HELP, description=verb.HELP)
        verb.arguments(sub)
        sub.set_defaults(handler=verb.run)
    return top


def app_name(value: str) -> str:
    problem = appnames.name_problem(value) if value != DEFAULT_APP else None
    if problem:
        raise argparse.ArgumentTypeError(f"{value!r}: {problem}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    async def run() -> int:
        try:
            client = await Client.connect(args.app)
        except OSError as exc:
            print(f"bluegreenctl: cannot reach the system bus: {exc}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        try:
            return int(await args.handler(client, args))
        except ApiError as exc:
            print(f"bluegreenctl: {exc.message}", file=sys.stderr)
            return exit_status_for(exc)
        finally:
            client.close()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
