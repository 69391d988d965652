"""app.instances = 2: deploys under load fail no request and both instances get traffic; an
instance killed under load, one of two or the only one, costs only the requests its workers
were serving (the others wait in its socket's queue while systemd restarts it)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    Load,
    call,
    deploy_new_release,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

# Five deploys prove the flow; a loss that shows once in 100,000 requests needs the stress
# test's 100 two-instance switches (test_stress.py, scripts/test --stress).
DEPLOYS = 5
# Load after the kill: long enough for systemd to restart the instance (RestartSec=1) and for
# gunicorn to boot it again.
AFTER_KILL = 8.0
# Clients of the load: each has one request in flight, so at most this many can be in the
# killed instance's workers.
CLIENTS = 4


@pytest.fixture(scope="module")
def config_extra() -> str:
    return settings(1, workers=4, app={"instances": 2})


def running_instances(box: Sandbox) -> list[int]:
    return sorted(port for port, state, _release in call(box, "ListInstances") if state == "active")


def active(box: Sandbox, unit: str) -> bool:
    return box.run("systemctl", "is-active", unit, check=False).stdout.strip() == "active"


def forwarders(box: Sandbox) -> list[str]:
    out = box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                  "bluegreen-forward@*").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_deploys_under_load_fail_no_request_and_spread_it(box: Sandbox, app: App) -> None:
    box.run("systemctl", "start", "bluegreen.service")
    wait_serving(box)
    ports = running_instances(box)
    assert len(ports) == 2, ports
    assert forwarders(box) == [f"bluegreen-forward@{port}.service" for port in ports]
    records = []
    with Load(box, "--fast", "4", "--slow", "2") as load:
        for number in range(DEPLOYS):
            records.append(deploy_new_release(box, app, f"Release {number + 2}"))
            time.sleep(1.0)  # the release serves a while before the next one replaces it
        ports = running_instances(box)
    report = load.report
    by_version: dict[str, dict[str, int]] = {}
    for key, count in report["instances"].items():
        version, _, instance = key.partition("@")
        by_version.setdefault(version, {})[instance] = count
    print(f"\n{report['requests']} requests ({report['requests_per_second']:.0f}/s), "
          f"{report['failed']} failed; requests per instance of each release: {by_version}")

    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    assert all(s["outcome"] == "ok" for s in report["slow"])
    assert len(report["versions"]) == DEPLOYS + 1, report["versions"]
    assert set(by_version) == set(report["versions"]), by_version
    # Every release ran on two instances, and clients reached both.
    for version, counts in by_version.items():
        assert len(counts) == 2 and min(counts.values()) > 0, (version, counts)
    # The last release serves on two instances, each behind its forwarder, and nothing else runs.
    assert len(ports) == 2, ports
    assert sorted(map(int, by_version[str(app.version)])) == ports
    assert forwarders(box) == [f"bluegreen-forward@{port}.service" for port in ports]
    assert public(box)["version"] == str(app.version)
    # Each deploy's first old forwarder steered as it closed to the two new ones alone: not to
    # the other old one, whose instance's drain flag was up, though it drained only after.
    hooks = box.journal("-u", "bluegreen-forward@*", "-o", "cat")
    assert hooks.count("new connections go to 2 of the 4 listeners") == DEPLOYS, hooks[-3000:]
    assert "not steered" not in hooks and "slot is not known" not in hooks, hooks[-3000:]


def restarts(box: Sandbox, unit: str) -> int:
    return int(box.run("systemctl", "show", "-P", "NRestarts", unit).stdout.strip())


def failed_when_killed(box: Sandbox, port: int) -> dict[str, Any]:
    """Load on the public port while the instance on ``port`` is SIGKILLed and systemd
    restarts it: its report."""
    unit = f"bluegreen-app@{port}.service"
    before = restarts(box, unit)
    with Load(box, "--fast", str(CLIENTS), "--slow", "0") as load:
        time.sleep(1.0)
        box.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", unit)
        time.sleep(AFTER_KILL)
    assert restarts(box, unit) == before + 1  # the gap the measurement is about was there
    return load.report


def wait_forwarder(box: Sandbox, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not active(box, f"bluegreen-forward@{port}.service"):
        assert time.monotonic() < deadline, f"the forwarder to port {port} did not come back"
        time.sleep(0.1)


def test_a_killed_instance_costs_only_the_requests_it_was_serving(box: Sandbox, app: App) -> None:
    box.run("systemctl", "start", "bluegreen.service")
    props = wait_serving(box)
    two = running_instances(box)
    assert len(two) == 2, two
    victim = two[1]
    with_two = failed_when_killed(box, victim)
    # Taken out while systemd restarted it (no recovery deploy), back on the public port once
    # healthy.
    wait_forwarder(box, victim)
    told = box.journal("-u", "bluegreen.service", "-o", "cat")
    assert f"taking the instance on port {victim} out of the public port" in told, told[-3000:]
    assert f"the instance on port {victim} is healthy again and back on the public port" in told
    assert active(box, f"bluegreen-app@{victim}.service")
    assert running_instances(box) == two
    assert wait_serving(box)["ActiveRelease"] == props["ActiveRelease"]
    with Load(box, "--fast", "4", "--slow", "0") as load:
        time.sleep(3.0)
    back = {key.partition("@")[2] for key in load.report["instances"]}
    # Both again: the forwarder started last joined the port's last slot, where the steering
    # program of its drain pointed.
    assert back == {str(port) for port in two}, load.report["instances"]

    # The same release on one instance: app.instances applies from the next deploy.
    app.commit("One instance", {"INSTANCES": "1\n"})
    box.write("/etc/bluegreen/bluegreen.toml",
              box.path("/etc/bluegreen/bluegreen.toml").read_text().replace(
                  "instances = 2", "instances = 1"))
    box.run("systemctl", "reload", "bluegreen.service")
    record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert record["state"] == "succeeded", record
    one = running_instances(box)
    assert len(one) == 1, one
    with_one = failed_when_killed(box, one[0])
    wait_serving(box)

    print(f"\nfailed requests when an instance is SIGKILLed under load ({AFTER_KILL:g} s "
          f"after the kill): {with_two['failed']} of {with_two['requests']} with two instances "
          f"{with_two['failures_by_kind']}, longest gap between successes "
          f"{with_two['longest_gap']:.2f} s; {with_one['failed']} of {with_one['requests']} "
          f"with one {with_one['failures_by_kind']}, longest gap {with_one['longest_gap']:.2f} s")
    # The requests that come while gunicorn restarts wait in the instance's socket.
    assert with_two["failed"] <= CLIENTS, with_two["failures"]
    assert with_one["failed"] <= CLIENTS, with_one["failures"]
