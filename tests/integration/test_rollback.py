"""Rollback by hand (CLI, HTTP) and by itself after the switch, under load; retention."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.integration.helpers import (
    SCRIPTED_APP,
    App,
    Load,
    call,
    deploy_new_release,
    deployment,
    git,
    http,
    properties,
    public,
    serving_app,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

KEEP = 2

# Healthy long enough to pass the health step and the switch, then its health check fails
# (while "/" goes on answering): only the post-switch watch can catch it.
SOURS_AFTER_START = SCRIPTED_APP + (
    "HEALTH = lambda: 'fine' if time.monotonic() - STARTED <= 2.5 else ('sour', 500)\n")


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, settings(5, workers=4, health={"unhealthy_threshold": 3},
                                release={"keep": KEEP}))


def test_cli_rollback_under_load(box: Sandbox, app: App) -> None:
    first = wait_serving(box)["ActiveRelease"]
    second = deploy_new_release(box, app, "Second")
    with Load(box, "--fast", "4", "--slow", "2") as load:
        result = box.run("bluegreenctl", "rollback", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "switch" in result.stdout and "succeeded" in result.stdout
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert all(s["outcome"] == "ok" for s in load.report["slow"])
    props = properties(box)
    assert props["ActiveRelease"] == first != second["commit"]
    record = deployment(box, props["LastDeployment"])
    assert record["trigger"] == "rollback"


def test_http_rollback_to_a_deployment_under_load(box: Sandbox, app: App) -> None:
    target = deploy_new_release(box, app, "Third")
    deploy_new_release(box, app, "Fourth")
    with Load(box, "--fast", "4", "--slow", "2") as load:
        response = http(box, "POST", "/rollback", json.dumps({"target": target["id"]}), unix=True)
        assert response.status == 202, response
        record = wait_deployment(box, response.body["id"])
    assert record["state"] == "succeeded", record
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert properties(box)["ActiveRelease"] == target["commit"]
    assert public(box)["release"] == target["commit"]


@pytest.mark.parametrize(("body", "status"), [
    pytest.param('{"target": "999999"}', 404, id="no-such-deployment"),
    pytest.param('{"target": "abcdef0"}', 404, id="not-on-disk"),
    pytest.param('{"target": "../../etc"}', 404, id="path"),
    pytest.param('{"target": 5}', 400, id="wrong-type"),
])
def test_bad_rollback_targets_change_nothing(box: Sandbox, app: App, body: str, status: int) -> None:
    before = wait_serving(box)
    response = http(box, "POST", "/rollback", body, unix=True)
    assert response.status == status, response
    assert response.body["message"]
    after = properties(box)
    assert (after["LastDeployment"], after["ActiveRelease"]) == (before["LastDeployment"],
                                                                 before["ActiveRelease"])


def test_a_release_that_sours_after_the_switch_is_switched_back(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    original = (app.work / "app.py").read_text()
    sour = app.commit("Sours after the switch", {"app.py": SOURS_AFTER_START})
    try:
        with Load(box, "--fast", "4", "--slow", "1") as load:
            record = wait_deployment(box, call(box, "Deploy", "s", sour))
        assert record["state"] == "switched-back", record
        assert record["failed_step"] == "watch"
        assert "HTTP 500" in record["reason"] and before["ActiveRelease"][:12] in record["reason"]
        steps = [s[0] for s in record["steps"]]
        assert steps[-3:] == ["drain", "watch", "switch-back"]
        switch_back_started = record["steps"][-1][1]
        # A figure, not a bound: the step includes stopping the soured instance.
        print(f"switch-back step took {record['finished_at'] - switch_back_started:.2f} s")
        after = properties(box)
        assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"],
                                                                 before["ActivePort"])
        assert public(box)["release"] == before["ActiveRelease"]
        assert box.run("systemctl", "is-active", f"bluegreen-app@{record['port']}.service",
                       check=False).stdout.strip() == "inactive"
        assert load.report["failed"] == 0, load.report["failures_by_kind"]
    finally:  # the next tests deploy the branch's head: a healthy one
        app.commit("Back to the healthy app", {"app.py": original})


def test_retention_keeps_the_newest_releases_and_the_rollback_target(box: Sandbox, app: App) -> None:
    for number in range(3):
        deploy_new_release(box, app, f"Retention {number}")
    serving = properties(box)["ActiveRelease"]
    on_disk = sorted(p.name for p in box.path("/var/lib/bluegreen/releases").iterdir())
    succeeded = []
    for record in call(box, "ListDeployments", "u", "100"):
        if record["state"] == "succeeded" and record["commit"] not in succeeded:
            succeeded.append(record["commit"])
    assert serving in on_disk
    assert sorted(on_disk) == sorted(succeeded[:KEEP]), (on_disk, succeeded)
    assert len(succeeded) > KEEP  # some were deleted
    for sha in succeeded[KEEP:]:
        assert sha not in on_disk


def wait_for_step(box: Sandbox, deployment_id: str, step: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = deployment(box, deployment_id)
        if record["steps"] and record["steps"][-1][0] == step:
            return
        assert record["state"] == "running", record
        time.sleep(0.05)
    raise AssertionError(f"deployment {deployment_id} never reached {step}")


def test_a_rollback_during_the_watch_switches_back_at_once(box: Sandbox, app: App) -> None:
    before = deploy_new_release(box, app, "Before the watch")
    app.commit("Watched")
    with Load(box, "--fast", "4", "--slow", "2") as load:
        running = call(box, "Deploy", "s", "")
        wait_for_step(box, running, "watch")
        asked = time.monotonic()
        result = box.run("bluegreenctl", "rollback", "--no-wait")
        while public(box)["release"] != before["commit"]:
            assert time.monotonic() - asked < 60, "traffic never went back"
        back = time.monotonic() - asked
        record = wait_deployment(box, running)
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert result.stdout.strip() == running  # the watched deployment ends; no new one starts
    assert record["state"] == "switched-back", record
    assert "switched back by the operator (user root (uid 0) over cli)" in record["reason"], record
    assert properties(box)["ActiveRelease"] == before["commit"]
    assert properties(box)["LastDeployment"] == running
    print(f"\nswitch-back asked during the watch: new connections reach the old release "
          f"{back:.2f} s after bluegreenctl rollback was run; the deployment ended "
          f"{record['finished_at'] - record['started_at']:.2f} s after it began")


def test_wait_queues_a_deploy_behind_the_running_one(box: Sandbox, app: App) -> None:
    app.commit("First of two")
    first = call(box, "Deploy", "s", "")
    busy = box.run("bluegreenctl", "deploy", "--no-wait", check=False)
    assert busy.returncode == 5, busy.stdout + busy.stderr
    second_sha = app.commit("Second of two")
    queued = box.run("bluegreenctl", "deploy", "--wait", "--no-wait", second_sha, timeout=180)
    second = queued.stdout.strip()
    assert deployment(box, first)["state"] == "succeeded"
    record = wait_deployment(box, second)
    assert record["state"] == "succeeded", record
    assert record["commit"] == second_sha
    assert record["started_at"] >= deployment(box, first)["finished_at"]


def test_a_rollback_needs_no_git_when_the_release_is_on_disk(box: Sandbox, app: App) -> None:
    gone = str(deploy_new_release(box, app, "Soon force-pushed away")["commit"])
    # The remote forgets it (a force-push, then its reflogs expire and gc prunes it), and so
    # does the mirror once it has fetched.
    git(app.work, "reset", "-q", "--hard", "HEAD~1")
    git(app.work, "push", "-q", "--force", str(app.bare), "main")
    later = str(deploy_new_release(box, app, "Replaces the force-pushed commit")["commit"])
    mirror = box.path("/var/lib/bluegreen/repository.git")
    for repository in (app.bare, mirror):
        git(repository, "reflog", "expire", "--expire=now", "--all")
        git(repository, "gc", "-q", "--prune=now")
        missing = subprocess.run(["git", "cat-file", "-e", f"{gone}^{{commit}}"], cwd=repository,
                                 capture_output=True)
        assert missing.returncode != 0, f"{gone[:12]} is still in {repository}"
    assert box.exists(f"/var/lib/bluegreen/releases/{gone}")
    with Load(box, "--fast", "4", "--slow", "2") as load:
        result = box.run("bluegreenctl", "rollback", gone[:12], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    props = properties(box)
    assert props["ActiveRelease"] == gone != later
    record = deployment(box, props["LastDeployment"])
    assert (record["trigger"], record["state"]) == ("rollback", "succeeded")
    assert record["subject"] == "Soon force-pushed away"
    assert public(box)["release"] == gone


def active_forwarders(box: Sandbox) -> list[str]:
    out = box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                  "bluegreen-forward@*", "bluegreen-proxy@*").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_a_switch_back_that_fails_leaves_the_truth_in_status(box: Sandbox, app: App) -> None:
    """The old forwarder cannot start again (masked) when the operator asks for the switch
    back: the new release goes on carrying the traffic, and the controller says so."""
    before = deploy_new_release(box, app, "Before the failed switch-back")
    old_forwarder = f"bluegreen-forward@{before['port']}.service"
    new = app.commit("Switched to, and stays")
    with Load(box, "--fast", "4", "--slow", "1") as load:
        running = call(box, "Deploy", "s", "")
        wait_for_step(box, running, "watch")
        box.run("systemctl", "mask", "--runtime", old_forwarder)
        try:
            box.run("bluegreenctl", "rollback", "--no-wait")
            record = wait_deployment(box, running)
        finally:
            box.run("systemctl", "unmask", "--runtime", old_forwarder)
        assert record["state"] == "failed", record
        assert f"{new[:12]} serves on port {record['port']}" in record["reason"], record["reason"]
        props = wait_serving(box)
        assert (props["ActiveRelease"], props["ActivePort"]) == (new, record["port"])
        status = http(box, "GET", "/status")
        assert status.body["release"] == new, status.body
        assert json.loads(box.run("bluegreenctl", "status", "--json").stdout)["ActiveRelease"] == new
        assert public(box)["release"] == new
        assert active_forwarders(box) == [f"bluegreen-forward@{record['port']}.service"]
        after = deploy_new_release(box, app, "After the failed switch-back")
        assert active_forwarders(box) == [f"bluegreen-forward@{after['port']}.service"]
        assert public(box)["release"] == after["commit"]
    assert load.report["failed"] == 0, (load.report["failures_by_kind"], load.report["failures"][:5])
