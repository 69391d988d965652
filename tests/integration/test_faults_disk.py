"""A full disk under /var/lib/bluegreen: deploys fail cleanly, the records stay whole, serving
goes on. The state directory is a 64 MiB tmpfs here, so that it can be filled."""

from __future__ import annotations

import time

import pytest

from tests.integration.helpers import (
    REPO,
    App,
    Load,
    busctl,
    call,
    properties,
    public,
    serving_app,
    settings,
    wait_deployment,
    wait_for_commit,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

STATE = "/var/lib/bluegreen"


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    def small_state_directory() -> None:
        box.run("mkdir", "-p", STATE)
        box.run("mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", STATE)

    fill = "test ! -e FILL || head -c 100000000 /dev/zero > filler"
    # The refresher looks only when asked (Refresh): the tests deploy by themselves.
    return serving_app(box, settings(0, workers=4, release={"build_command": fill}),
                       repository="poll_interval = 3600\n", prepare=small_state_directory)


def integrity(box: Sandbox) -> str:
    return box.run("python3", "-c", "import sqlite3; print(sqlite3.connect("
                   f"'{STATE}/bluegreen.db').execute('PRAGMA integrity_check').fetchone()[0])").stdout.strip()


def free_bytes(box: Sandbox) -> int:
    return int(box.run("df", "--output=avail", "-B1", STATE).stdout.split()[-1])


def test_a_build_that_fills_the_disk_fails_cleanly(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    free = free_bytes(box)
    app.commit("A build that fills the disk", {"FILL": "yes\n"})
    with Load(box, "--fast", "3", "--slow", "1") as load:
        record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert (record["state"], record["failed_step"]) == ("failed", "verify"), record
    assert "No space left on device" in record["reason"], record["reason"]
    assert load.report["failed"] == 0
    assert integrity(box) == "ok"
    assert free_bytes(box) >= free - 1_000_000  # the half-built release is gone
    after = properties(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    (app.work / "FILL").unlink()
    app.commit("No more filling")


def test_a_full_disk_refuses_the_deploy_and_keeps_serving(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    last = before["LastDeployment"]
    app.commit("Arrives on a full disk")
    box.sh(f"head -c {free_bytes(box) + 4096} /dev/zero > {STATE}/filler || true")
    assert free_bytes(box) == 0
    try:
        with Load(box, "--fast", "3", "--slow", "1") as load:
            result = busctl(box, "call", "org.bluegreen1", "/org/bluegreen1", "org.bluegreen1.Manager",
                            "Deploy", "s", "", check=False)
            if result.returncode == 0:  # accepted (recorded): then it must fail, not half-succeed
                deployment_id = result.stdout.split('"data":["')[1].split('"')[0]
                record = wait_deployment(box, deployment_id)
                assert record["state"] == "failed", record
            else:
                assert "No space left on device" in result.stderr, result.stderr
        assert load.report["failed"] == 0
        assert integrity(box) == "ok"
        after = properties(box)
        assert after["ActiveRelease"] == before["ActiveRelease"]
        assert after["ActivePort"] == before["ActivePort"]
        assert public(box)["release"] == before["ActiveRelease"]
        assert after["State"] == "serving"
    finally:
        box.run("rm", "-f", f"{STATE}/filler")
    record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert record["state"] == "succeeded", record
    assert int(record["id"]) > int(last)


def fill_records_disk(box: Sandbox) -> None:
    """Fill the disk so that the records cannot grow: their write-ahead log is emptied first
    (a log with room left would take a few more writes)."""
    box.run("python3", "-c", "import sqlite3; sqlite3.connect("
            f"'{STATE}/bluegreen.db').execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()")
    box.sh(f"head -c {free_bytes(box) + 4096} /dev/zero > {STATE}/filler || true")
    assert free_bytes(box) == 0


def journal_grep(box: Sandbox, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = box.journal("-u", "bluegreen.service", "-o", "cat", "--grep", text)
        if text in found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the journal:\n"
                         + box.journal("-u", "bluegreen.service", "-n", "40"))


def test_the_refresher_deploys_again_once_space_is_back(box: Sandbox, app: App) -> None:
    wait_serving(box)
    sha = app.commit("Pushed onto a full disk")
    # Already fetched (a fetch would fail on the full disk before the deployment begins).
    box.run("git", f"--git-dir={STATE}/repository.git", "fetch", "-q", REPO,
            "+refs/heads/*:refs/remotes/origin/*")
    fill_records_disk(box)
    try:
        call(box, "Refresh")
        journal_grep(box, f"the refresher cannot deploy {sha[:12]}")
    finally:
        box.run("rm", "-f", f"{STATE}/filler")
    call(box, "Refresh")
    record = wait_for_commit(box, sha)
    assert (record["trigger"], record["state"]) == ("refresher", "succeeded"), record
    assert properties(box)["ActiveRelease"] == sha


def test_recovery_goes_on_once_space_is_back(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    unit = f"bluegreen-app@{before['ActivePort']}.service"
    fill_records_disk(box)
    box.run("systemctl", "kill", "--signal=SIGSTOP", unit)
    try:
        try:
            journal_grep(box, "recovery not started")
        finally:
            box.run("rm", "-f", f"{STATE}/filler")
        deadline = time.monotonic() + 90
        props = properties(box)
        while props["ActivePort"] == before["ActivePort"] and time.monotonic() < deadline:
            time.sleep(0.2)
            props = properties(box)
    finally:
        box.run("systemctl", "kill", "--signal=SIGCONT", unit, check=False)
    props = wait_serving(box)
    assert props["ActivePort"] != before["ActivePort"]
    assert props["ActiveRelease"] == before["ActiveRelease"]
    record = call(box, "GetDeployment", "s", props["LastDeployment"])
    assert (record["trigger"], record["state"]) == ("recovery", "succeeded"), record
    assert public(box)["release"] == before["ActiveRelease"]
