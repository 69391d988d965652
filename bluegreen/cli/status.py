"""bluegreenctl status: what serves, and how healthy it is. Runs in bluegreenctl, a thin client
of the D-Bus API."""

from __future__ import annotations

import argparse

from bluegreen.cli.common import error_rate, print_json, timestamp
from bluegreen.client import Client
from bluegreen.config import share_text

NAME = "status"
HELP = "what serves, and how healthy it is"


def arguments(parser: argparse.ArgumentParser) -> None:
    pass


async def run(client: Client, args: argparse.Namespace) -> int:
    status = await client.status()
    pending = await client.pending_settings()
    domains = await client.domains()
    if args.json:
        status["Instances"] = await client.instances()
        status["Workers"] = await client.workers()
        status["PendingSettings"] = pending
        status["Domains"] = domains
        print_json(status)
        return 0
    release = status["ActiveRelease"]
    serving = f"{release[:12]} on port {status['ActivePort']} via port {status['PublicPort']}" \
        if release else "(nothing)"
    health = "healthy" if status["Healthy"] else "unhealthy"
    watching = f"watching {status['Branch']}" if status["Watching"] else "manual deploys only"
    print(f"State:       {status['State']}")
    print(f"Serving:     {serving}")
    print(f"Health:      {health}: {status['HealthReason']}")
    print(f"Repository:  {status['Repository'] or '(not configured)'} ({watching})")
    if status["Maintenance"]:
        print(f"Maintenance: on: the front answers 503 with \"{status['MaintenanceMessage']}\"")
    if status["RemoteError"]:
        print(f"Remote:      {status['RemoteError']}")
    if status["CurrentDeployment"]:
        print(f"Deploying:   deployment {status['CurrentDeployment']}")
    canary = status.get("Canary")  # {} when none runs
    if canary:
        print(f"Canary:      {share_text(canary['share'])} of new connections asked, "
              f"{canary['measured_share']:.1%} of the answers measured; "
              f"{canary['elapsed']:.0f} s of {canary['duration']:.0f} s")
        for name, side in (("new", "canary"), ("old", "stable")):
            requests, errors = canary[f"{side}_requests"], canary[f"{side}_errors"]
            print(f"             {name} release: {requests} answers, {errors} 5xx "
                  f"({error_rate(errors, requests)})")
    if status["LastDeployment"]:
        last = await client.deployment(status["LastDeployment"])
        print(f"Last:        deployment {last['id']} {last['state']} at {timestamp(last['finished_at'])}"
              f" ({last['commit'][:12]} {last['subject']})")
        for step in last.get("web_steps", ()):  # what became of the Procfile's web line
            print(f"Web line:    {step}")
    for instance in await client.instances():
        print(f"Instance:    port {instance['port']} {instance['state']} {instance['release'][:12]}")
    for worker in await client.workers():
        print(f"Worker:      {worker['name']} (port {worker['port']}) {worker['state']} "
              f"{worker['release'][:12]}")
    for domain in domains:
        certificate = f"certificate from {domain['issuer']}, expires {timestamp(domain['expires'])}" \
            if domain["issuer"] else "no certificate"
        reason = f": {domain['reason']}" if domain["reason"] else ""
        print(f"Domain:      {domain['domain']}: {certificate}{reason}")
    for setting in pending:
        print(f"Pending:     {setting['key']} (applies {setting['applies']})")
    totals: dict[str, int] = status.get("DeploymentsFinished", {})
    if totals:
        print("Since start: " + ", ".join(f"{count} {state}" for state, count in sorted(totals.items())))
    return 0

