"""A full disk under /var/lib/bluegreen: deploys fail cleanly, the records stay whole, serving
goes on. The state directory is a 64 MiB tmpfs here, so that it can be filled."""

from __future__ import annotations

import pytest

from tests.integration.helpers import (
    App,
    Load,
    busctl,
    call,
    properties,
    public,
    serving_app,
    wait_deployment,
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
    return serving_app(box, "post_switch_watch = 0\n[app]\nworkers = 4\n[health]\ninterval = 0.2\n"
                       f'[release]\nbuild_command = "{fill}"\n', prepare=small_state_directory)


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
