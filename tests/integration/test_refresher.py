"""Push to deploy: the refresher picks up new commits, and refuses broken ones before any unit."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.integration.helpers import (
    App,
    call,
    http,
    kill_controller,
    properties,
    serving_app,
    settings,
    wait_for_commit,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

POLL = 2.0
BUILD_FAILS = "echo building; echo 'compiler says no' >&2; exit 3"


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, settings(1, release={"build_command": "test ! -e BUILD_FAILS || sh BUILD_FAILS"}),
                       repository=f"poll_interval = {POLL:g}\n")


def units_started_since(box: Sandbox, since: float) -> list[str]:
    out = box.run("journalctl", "--no-pager", "-o", "cat", f"--since=@{since:.3f}",
                  "-u", "bluegreen-app@*").stdout
    return [line for line in out.splitlines() if line.startswith("Starting bluegreen-app@")]


def deployments_of(box: Sandbox, sha: str) -> list[dict[str, object]]:
    return [d for d in call(box, "ListDeployments", "u", "50") if d["commit"] == sha]


def test_a_push_is_serving_within_the_poll_interval(box: Sandbox, app: App) -> None:
    wait_serving(box)
    sha = app.commit("Pushed release")
    pushed = time.monotonic()
    while time.monotonic() - pushed < 30:
        page = http(box, "GET", "/", port=5000)
        if page.status == 200 and page.body.get("release") == sha:
            break
        time.sleep(0.05)
    latency = time.monotonic() - pushed
    record = wait_for_commit(box, sha)
    steps = {name: finished - started for name, started, finished in record["steps"]}
    startup = steps["start"] + steps["health"]
    print(f"\npush-to-serving latency {latency:.2f} s (poll_interval {POLL:g} s, "
          f"app start-up + health {startup:.2f} s)")
    assert record["trigger"] == "refresher" and record["state"] in ("running", "succeeded")
    assert latency <= POLL + startup + 2.0


def test_a_broken_import_never_starts_a_unit_and_is_not_retried(box: Sandbox, app: App) -> None:
    serving = wait_serving(box)
    since = time.time()
    good = app.head()
    broken = app.commit("Import a module that does not exist",
                        {"app.py": "import no_such_module\n" + (app.work / "app.py").read_text()})
    record = wait_for_commit(box, broken)
    assert record["state"] == "failed" and record["failed_step"] == "verify", record
    assert "No module named 'no_such_module'" in record["reason"]
    time.sleep(3 * POLL)  # three more polls see the same head
    assert len(deployments_of(box, broken)) == 1
    assert units_started_since(box, since) == []
    assert properties(box)["ActiveRelease"] == serving["ActiveRelease"]
    app.revert_to(good, "Repair the import")


def test_a_failing_build_never_starts_a_unit(box: Sandbox, app: App) -> None:
    repaired = wait_for_commit(box, app.head())
    assert repaired["state"] == "succeeded"
    serving = wait_serving(box)
    since = time.time()
    failing = app.commit("A build that fails", {"BUILD_FAILS": BUILD_FAILS})
    record = wait_for_commit(box, failing)
    assert record["state"] == "failed" and record["failed_step"] == "verify", record
    assert "release.build_command failed (exited with status 3): building; compiler says no" \
        in record["reason"], record["reason"]
    assert units_started_since(box, since) == []
    assert not box.path(f"/var/lib/bluegreen/releases/{failing}").exists()
    assert properties(box)["ActiveRelease"] == serving["ActiveRelease"]
    # Asked for explicitly, the same commit is tried again (and fails the same way).
    again = call(box, "Deploy", "s", failing)
    assert again != record["id"]
    (app.work / "BUILD_FAILS").unlink()
    app.commit("Remove the failing build step")


def test_an_unreachable_remote_backs_off_and_serving_goes_on(box: Sandbox, app: App) -> None:
    wait_for_commit(box, app.head())
    serving = wait_serving(box)
    moved = app.bare.with_name("moved.git")
    shutil.move(app.bare, moved)
    try:
        time.sleep(4 * POLL)
        props = properties(box)
        assert "git ls-remote" in props["RemoteError"], props["RemoteError"]
        warnings = box.journal("-u", "bluegreen.service", "-o", "cat", "--grep", "cannot read")
        attempts = [line for line in warnings.splitlines() if "(attempt" in line]
        assert attempts and "attempt 1, next in 4 s" in attempts[0], warnings
        assert len(attempts) <= 3  # backing off: 4 s, then 8 s
        assert http(box, "GET", "/", port=5000).status == 200
        assert props["ActiveRelease"] == serving["ActiveRelease"]
    finally:
        shutil.move(moved, app.bare)
    deadline = time.monotonic() + 30
    while properties(box)["RemoteError"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert properties(box)["RemoteError"] == ""
    assert "answers again" in box.journal("-u", "bluegreen.service", "-o", "cat", "--grep", "answers again")


def test_a_pushed_commit_whose_deploy_was_interrupted_ships_after_the_restart(box: Sandbox,
                                                                               app: App) -> None:
    """The controller dies (SIGKILL) while it verifies a pushed commit: once systemd has
    restarted it, the commit ships without another push."""
    wait_for_commit(box, app.head())
    wait_serving(box)
    slow = app.commit("A build that takes a while", {"BUILD_FAILS": "sleep 6\n"})
    deadline = time.monotonic() + 60
    running: list[dict[str, object]] = []
    while not running and time.monotonic() < deadline:
        running = [d for d in deployments_of(box, slow) if d["state"] == "running"
                   and [step[0] for step in d["steps"]][-1:] == ["verify"]]  # type: ignore[attr-defined]
        time.sleep(0.1)
    assert running, deployments_of(box, slow)
    kill_controller(box)
    wait_serving(box)  # the restarted controller answers (the old release serves)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records = deployments_of(box, slow)
        if any(d["state"] == "succeeded" for d in records):
            break
        time.sleep(0.5)
    states = sorted(str(d["state"]) for d in deployments_of(box, slow))
    assert states == ["interrupted", "succeeded"], states
    assert wait_serving(box)["ActiveRelease"] == slow
    (app.work / "BUILD_FAILS").unlink()
    app.commit("Builds fast again")
