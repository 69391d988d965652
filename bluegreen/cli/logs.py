"""bluegreenctl logs [ID]: the journal entries of one deployment (default: the last one).

The controller's entries carry DEPLOYMENT_ID; the new instance's own output (a traceback of a
release that fails to start, say) is added for the time the deployment ran.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from bluegreen.api.names import EXIT_FAILED
from bluegreen.cli.common import print_json
from bluegreen.client import Client
from bluegreen.config import DEFAULT_APP

NAME = "logs"
HELP = "the journal entries of one deployment (default: the last)"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", nargs="?", default="", help="deployment id (default: the last one)")


def entries(record: dict[str, Any], app: str = DEFAULT_APP) -> list[dict[str, Any]]:
    from systemd import journal

    reader = journal.Reader()
    reader.add_match(DEPLOYMENT_ID=record["id"])
    if record["port"]:
        reader.add_disjunction()
        reader.add_match(_SYSTEMD_UNIT=f"bluegreen-app@{record['port']}.service")
    reader.seek_realtime(datetime.fromtimestamp(record["started_at"] - 1))
    until = (record["finished_at"] or datetime.now().timestamp()) + 1
    found = []
    for entry in reader:
        when: datetime = entry["__REALTIME_TIMESTAMP"]
        if when.timestamp() > until:
            break
        if entry.get("DEPLOYMENT_ID") not in (None, record["id"]):
            continue
        if "DEPLOYMENT_ID" in entry and entry.get("APP", DEFAULT_APP) != app:
            continue  # deployment ids are each app's own
        found.append({
            "time": when.timestamp(),
            "identifier": entry.get("SYSLOG_IDENTIFIER", ""),
            "pid": entry.get("_PID", ""),
            "unit": entry.get("_SYSTEMD_UNIT", ""),
            "message": str(entry.get("MESSAGE", "")),
            "step": entry.get("STEP", ""),
        })
    return found


async def run(client: Client, args: argparse.Namespace) -> int:
    deployment_id = args.id or (await client.status())["LastDeployment"]
    if not deployment_id:
        print("bluegreenctl: no deployment yet", file=sys.stderr)
        return EXIT_FAILED
    record = await client.deployment(deployment_id)
    found = entries(record, client.app)
    if args.json:
        print_json(found)
        return 0
    if not found:
        print(f"bluegreenctl: no journal entries for deployment {deployment_id} "
              "(reading the system journal needs root or the systemd-journal group)", file=sys.stderr)
        return EXIT_FAILED
    for entry in found:
        when = datetime.fromtimestamp(entry["time"]).strftime("%b %d %H:%M:%S.%f")[:-3]
        print(f"{when} {entry['identifier']}[{entry['pid']}]: {entry['message']}")
    return 0
