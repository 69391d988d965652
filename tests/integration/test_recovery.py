"""Health monitoring with recovery, and a controller killed in the middle of a deploy."""

from __future__ import annotations

import time

import pytest

from bluegreen.log import MessageId
from tests.integration.helpers import (
    App,
    Load,
    call,
    deployment,
    properties,
    public,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config_extra() -> str:
    return ("drain_timeout = 5\npost_switch_watch = 1\n[app]\nworkers = 4\n"
            "[health]\ninterval = 0.2\ntimeout = 0.5\nunhealthy_threshold = 3\n")


def active_units(box: Sandbox, pattern: str) -> list[str]:
    out = box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active", pattern).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def wait_step(box: Sandbox, deployment_id: str, step: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [s[0] for s in deployment(box, deployment_id)["steps"]]
        if steps and steps[-1] == step:
            return
        time.sleep(0.05)
    raise AssertionError(f"deployment {deployment_id} never reached step {step}")


def wait_journal(box: Sandbox, message_id: str, timeout: float = 30) -> str:
    """The controller's journal messages with this MESSAGE_ID, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = box.journal("-u", "bluegreen.service", f"MESSAGE_ID={message_id}", "-o", "cat")
        if found.strip() and "-- No entries --" not in found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no journal entry {message_id}:\n"
                         + box.journal("-u", "bluegreen.service", "-n", "40"))


def kill_controller(box: Sandbox) -> None:
    pid = box.run("systemctl", "show", "-P", "MainPID", "bluegreen.service").stdout.strip()
    box.run("systemctl", "kill", "--signal=SIGKILL", "bluegreen.service")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = box.run("systemctl", "show", "-P", "MainPID", "bluegreen.service").stdout.strip()
        if now not in ("0", pid):
            return
        time.sleep(0.1)
    raise AssertionError("systemd did not restart the killed controller")


def assert_one_release_serves(box: Sandbox, release: str) -> None:
    props = wait_serving(box)
    assert props["ActiveRelease"] == release
    port = props["ActivePort"]
    assert active_units(box, "bluegreen-app@*") == [f"bluegreen-app@{port}.service"]
    assert active_units(box, "bluegreen-forward@*") == [f"bluegreen-forward@{port}.service"]


def test_an_unhealthy_instance_is_replaced(box: Sandbox, app: App) -> None:
    box.run("systemctl", "start", "bluegreen.service")
    before = wait_serving(box)
    unit = f"bluegreen-app@{before['ActivePort']}.service"
    box.run("systemctl", "kill", "--signal=SIGSTOP", unit)
    wait_journal(box, MessageId.RECOVERY)
    box.run("systemctl", "kill", "--signal=SIGCONT", unit)
    props = wait_serving(box, timeout=90)
    record = deployment(box, props["LastDeployment"])
    assert record["trigger"] == "recovery"
    assert record["state"] == "succeeded", record
    assert props["ActiveRelease"] == before["ActiveRelease"]
    assert props["ActivePort"] != before["ActivePort"]
    assert public(box)["release"] == before["ActiveRelease"]
    assert "failed checks in a row" in wait_journal(box, MessageId.UNHEALTHY)


def test_controller_killed_during_health_checks(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    slow_start = "import time\ntime.sleep(4)\n" + (app.work / "app.py").read_text()
    app.commit("Slow to start", {"app.py": slow_start})
    with Load(box, "--fast", "3", "--slow", "1") as load:
        deployment_id = call(box, "Deploy", "s", "")
        wait_step(box, deployment_id, "health")
        new_port = deployment(box, deployment_id)["port"]
        kill_controller(box)
        assert_one_release_serves(box, before["ActiveRelease"])
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    record = deployment(box, deployment_id)
    assert record["state"] == "interrupted", record
    inactive = box.run("systemctl", "is-active", f"bluegreen-app@{new_port}.service", check=False)
    assert inactive.stdout.strip() in ("inactive", "failed")
    # No lock is left behind: the next deploy runs.
    again = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert again["state"] == "succeeded", again
    assert_one_release_serves(box, again["commit"])


def test_controller_killed_during_the_drain(box: Sandbox, app: App) -> None:
    wait_serving(box)
    sha = app.commit("Release killed mid-drain")
    with Load(box, "--fast", "3", "--slow", "2", "--slow-seconds", "4") as load:
        deployment_id = call(box, "Deploy", "s", "")
        wait_step(box, deployment_id, "drain")
        kill_controller(box)
        assert_one_release_serves(box, sha)
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert all(s["outcome"] == "ok" for s in load.report["slow"]), load.report["slow"]
    assert deployment(box, deployment_id)["state"] == "interrupted"
    assert properties(box)["State"] == "serving"
