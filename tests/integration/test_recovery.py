"""Health monitoring with recovery, and a controller killed in the middle of a deploy."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bluegreen.log import MessageId
from tests.integration.helpers import (
    SCRIPTED_APP,
    App,
    Load,
    call,
    deployment,
    kill_controller,
    properties,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

# Healthy through the health step and the switch, then its health check fails: the watch
# switches back.
SOURS_AFTER_START = SCRIPTED_APP + (
    "HEALTH = lambda: 'fine' if time.monotonic() - STARTED <= 2.5 else ('sour', 500)\n")

SLOW_BUILD = 6


@pytest.fixture(scope="module")
def config_extra() -> str:
    # A release that holds the file slow-build takes a while to build.
    return settings(3, workers=4, top={"drain_timeout": 5},
                    health={"timeout": 0.5, "unhealthy_threshold": 3},
                    release={"build_command": f"if [ -e slow-build ]; then sleep {SLOW_BUILD}; fi"})


@pytest.fixture(scope="module", autouse=True)
def slow_starts(box: Sandbox) -> None:
    """Starting an instance or a forwarder takes a second longer here, so that a test can kill
    the controller while systemd still runs the start job."""
    box.write("/etc/systemd/system/bluegreen-app@.service.d/slow.conf",
              "[Service]\nExecStartPre=/bin/sleep 1\n")
    box.write("/etc/systemd/system/bluegreen-forward@.service.d/slow.conf",
              "[Service]\nExecStartPre=/bin/sleep 1\n")
    box.run("systemctl", "daemon-reload")


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


def assert_one_release_serves(box: Sandbox, release: str) -> None:
    props = wait_serving(box)
    assert props["ActiveRelease"] == release
    port = props["ActivePort"]
    assert active_units(box, "bluegreen-app@*.service") == [f"bluegreen-app@{port}.service"]
    assert active_units(box, "bluegreen-app@*.socket") == [f"bluegreen-app@{port}.socket"]
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


STEPS = ("start", "health", "switch", "drain", "watch")


@pytest.mark.parametrize("step", STEPS)
def test_controller_killed_at_each_step(box: Sandbox, app: App, step: str) -> None:
    """SIGKILL at a step: systemd restarts the controller, which reconciles; no request fails."""
    before = wait_serving(box)
    sha = app.commit(f"Killed at {step}")
    with Load(box, "--fast", "3", "--slow", "2", "--slow-seconds", "4") as load:
        deployment_id = call(box, "Deploy", "s", "")
        wait_step(box, deployment_id, step)
        new_port = deployment(box, deployment_id)["port"]
        kill_controller(box)
        props = wait_serving(box, timeout=90)
        if step == "switch":  # killed before or after the new forwarder listened: either serves
            expected = props["ActiveRelease"]
            assert expected in (before["ActiveRelease"], sha), props
        else:
            expected = before["ActiveRelease"] if step in ("start", "health") else sha
        assert_one_release_serves(box, expected)
        assert public(box)["release"] == expected
    assert load.report["failed"] == 0, (load.report["failures_by_kind"], load.report["failures"][:5])
    assert all(s["outcome"] == "ok" for s in load.report["slow"]), load.report["slow"]
    assert deployment(box, deployment_id)["state"] == "interrupted"
    if expected == before["ActiveRelease"]:
        inactive = box.run("systemctl", "is-active", f"bluegreen-app@{new_port}.service", check=False)
        assert inactive.stdout.strip() in ("inactive", "failed")
    else:
        assert props["ActivePort"] == new_port
    # No lock is left behind: the next deploy runs.
    again = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert again["state"] == "succeeded", again


def test_recovery_tries_again_after_a_failed_redeploy(box: Sandbox, app: App) -> None:
    """The first redeploy cannot start its instance; a later one, once it can, replaces the
    unhealthy instance."""
    box.run("systemctl", "start", "bluegreen.service")
    before = wait_serving(box)
    unit = f"bluegreen-app@{before['ActivePort']}.service"
    refuse = "/etc/systemd/system/bluegreen-app@.service.d/refuse.conf"
    box.write(refuse, "[Service]\nExecStartPre=/bin/false\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "kill", "--signal=SIGSTOP", unit)
    try:
        deadline = time.monotonic() + 60
        failed: list[dict[str, object]] = []
        while not failed and time.monotonic() < deadline:
            failed = [d for d in call(box, "ListDeployments", "u", "5")
                      if int(d["id"]) > int(before["LastDeployment"]) and d["state"] == "failed"]
            time.sleep(0.2)
        assert failed and failed[0]["trigger"] == "recovery", failed
    finally:
        box.path(refuse).unlink()
        box.run("systemctl", "daemon-reload")
    deadline = time.monotonic() + 120
    props = properties(box)
    while props["ActivePort"] == before["ActivePort"] and time.monotonic() < deadline:
        time.sleep(0.2)
        props = properties(box)
    box.run("systemctl", "kill", "--signal=SIGCONT", unit, check=False)
    props = wait_serving(box)
    record = deployment(box, props["LastDeployment"])
    assert (record["trigger"], record["state"]) == ("recovery", "succeeded"), record
    assert props["ActiveRelease"] == before["ActiveRelease"]
    assert props["ActivePort"] != before["ActivePort"]
    assert public(box)["release"] == before["ActiveRelease"]


def test_controller_killed_during_a_switch_back_keeps_the_old_release(box: Sandbox, app: App) -> None:
    """SIGKILL while the switch-back's old forwarder starts (a second here): the new forwarder
    still listens, so both releases have one, the new deployment the newer. The restarted
    controller finishes the switch-back instead of keeping the release that failed its watch."""
    box.run("systemctl", "start", "bluegreen.service")
    before = wait_serving(box)
    original = (app.work / "app.py").read_text()
    sour = app.commit("Sours after the switch", {"app.py": SOURS_AFTER_START})
    old_forwarder = f"bluegreen-forward@{before['ActivePort']}.service"
    try:
        with Load(box, "--fast", "3", "--slow", "1") as load:
            deployment_id = call(box, "Deploy", "s", sour)
            wait_step(box, deployment_id, "switch-back", timeout=60)
            deadline = time.monotonic() + 10
            while box.run("systemctl", "is-active", old_forwarder,
                          check=False).stdout.strip() != "activating":
                assert time.monotonic() < deadline, f"{old_forwarder} never started again"
                time.sleep(0.02)
            kill_controller(box)
            assert_one_release_serves(box, before["ActiveRelease"])
            assert public(box)["release"] == before["ActiveRelease"]
        assert load.report["failed"] == 0, (load.report["failures_by_kind"], load.report["failures"][:5])
        assert deployment(box, deployment_id)["state"] == "interrupted"
        assert wait_serving(box)["ActivePort"] == before["ActivePort"]
    finally:  # the next deploys take the branch's head: a healthy one
        app.commit("Back to the healthy app", {"app.py": original})

def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.05)


def loaded_units(box: Sandbox, pattern: str) -> list[str]:
    out = box.run("systemctl", "list-units", "--all", "--plain", "--no-legend", pattern).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_a_build_left_running_by_a_killed_controller_is_stopped_and_its_staging_removed(
        box: Sandbox, app: App) -> None:
    """The build goes on in its own unit after the controller died; the restarted controller
    stops it and removes its staging directory (the build user's) before it serves."""
    box.run("systemctl", "start", "bluegreen.service")
    wait_serving(box)
    sha = app.commit("A slow build", {"slow-build": ""})
    deploying = call(box, "Deploy", "s", "")
    wait_for("the build unit", lambda: bool(loaded_units(box, "bluegreen-build-*")))
    releases = box.path("/var/lib/bluegreen/releases")
    assert [p for p in releases.iterdir() if p.name.startswith(".")], "no staging directory"
    kill_controller(box)
    wait_serving(box)
    assert loaded_units(box, "bluegreen-build-*") == []
    assert [p.name for p in releases.iterdir() if p.name.startswith(".")] == []
    assert deployment(box, deploying)["state"] == "interrupted"
    assert not box.path(f"/var/lib/bluegreen/releases/{sha}").exists()
    (app.work / "slow-build").unlink()
    app.commit("No slow build")


def test_a_release_phase_left_running_by_a_killed_controller_ends_before_the_next_starts(
        box: Sandbox, app: App) -> None:
    """Two release phases of one app never run at once, not even across a controller crash."""
    box.run("systemctl", "start", "bluegreen.service")
    wait_serving(box)
    phases = "/var/lib/bluegreen/data/phases"
    log = (f'echo "$1 $BLUEGREEN_DEPLOYMENT_ID" >> {phases}')
    app.commit("A slow release phase",
               {"Procfile": f"release: sh -c '{log}' - start; sleep 4; sh -c '{log}' - end\n"})
    first = call(box, "Deploy", "s", "")
    wait_for("the release phase", lambda: box.exists(phases))
    kill_controller(box)
    wait_serving(box, timeout=90)
    second = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert second["state"] == "succeeded", second
    assert deployment(box, first)["state"] == "interrupted"
    lines = box.path(phases).read_text().split("\n")
    assert lines == [f"start {first}", f"end {first}", f"start {second['id']}",
                     f"end {second['id']}", ""], lines
    app.commit("No release phase", {"Procfile": "# no release phase\n"})
