"""Faulty releases, under load: none of them ever receives traffic, and the old one serves on.

Each case is deployed with bluegreenctl, which must exit non-zero with the step and reason.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.helpers import (
    SCRIPTED_APP,
    App,
    Load,
    deployment,
    properties,
    public,
    serving_app,
    settings,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

DEADLINE = 5

CASES = {
    "import": ("import no_such_module\n" + SCRIPTED_APP + "HEALTH = lambda: 'ok'\n", "verify",
               "No module named 'no_such_module'"),
    "http-500": (SCRIPTED_APP + "HEALTH = lambda: ('broken', 500)\n", "health", "HTTP 500"),
    # Imports fine when verified, hangs in the instance (where BLUEGREEN_PORT is set).
    "never-starts": ("import os, time\nif os.environ.get('BLUEGREEN_PORT'):\n    time.sleep(3600)\n"
                     + SCRIPTED_APP + "HEALTH = lambda: 'ok'\n", "health",
                     f"not healthy within {DEADLINE} s; last check: no answer"),
    "healthy-too-late": (SCRIPTED_APP + "HEALTH = lambda: 'ok' if time.monotonic() - STARTED > 15 "
                         "else ('warming up', 503)\n", "health", f"not healthy within {DEADLINE} s"),
    # Passing 0.3 s of every second (in every worker alike): probes 0.2 s apart never see
    # healthy_threshold (3) passes in a row.
    "flapping": (SCRIPTED_APP + "HEALTH = lambda: 'ok' if time.time() % 1 < 0.3 else ('flap', 500)\n",
                 "health", f"not healthy within {DEADLINE} s"),
}


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, settings(3, workers=4, health={"timeout": 1, "healthy_threshold": 3,
                                                        "deadline": DEADLINE}))


@pytest.mark.parametrize("case", list(CASES))
def test_a_faulty_release_never_receives_traffic(box: Sandbox, app: App, case: str) -> None:
    source, step, reason = CASES[case]
    before = wait_serving(box)
    good = app.head()
    app.commit(f"Faulty: {case}", {"app.py": source})
    with Load(box, "--fast", "3", "--slow", "1") as load:
        result = box.run("bluegreenctl", "deploy", check=False, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"failed at step {step}" in result.stdout and reason in result.stdout, result.stdout
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert all(s["outcome"] == "ok" for s in load.report["slow"])
    record = deployment(box, properties(box)["LastDeployment"])
    assert (record["state"], record["failed_step"]) == ("failed", step)
    assert reason in record["reason"]
    if step == "verify":
        assert record["port"] == 0  # refused before any unit started
    else:
        state = box.run("systemctl", "is-active", f"bluegreen-app@{record['port']}.service", check=False)
        assert state.stdout.strip() in ("inactive", "failed")
    after = properties(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert public(box)["release"] == before["ActiveRelease"]
    app.revert_to(good, f"Undo {case}")


def test_a_release_that_dies_after_the_switch_is_switched_back(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    app.commit("Dies after the switch")
    with Load(box, "--fast", "3", "--slow", "1") as load:
        deploying = box.run("bluegreenctl", "deploy", "--no-wait").stdout.strip()
        deadline = time.monotonic() + 90  # a guard, not a figure: a busy host builds slowly
        while deployment(box, deploying)["steps"][-1][0] != "watch":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        new_port = deployment(box, deploying)["port"]
        killed = time.time()
        box.run("systemctl", "kill", "--signal=SIGKILL", f"bluegreen-app@{new_port}.service")
        while deployment(box, deploying)["state"] == "running":
            assert time.monotonic() < deadline + 30
            time.sleep(0.1)
    record = deployment(box, deploying)
    assert record["state"] == "switched-back", record
    assert "unhealthy after the switch" in record["reason"]
    after = properties(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    switch_back = next(started for step, started, _ in record["steps"] if step == "switch-back")
    back = record["finished_at"] - killed
    failed = load.report["failed"]
    print(f"\nthe new release died; traffic was back on the old one {back:.2f} s later "
          f"(the switch-back began {switch_back - killed:.2f} s after the kill); requests failed meanwhile: "
          f"{failed} of {load.report['requests']} {load.report['failures_by_kind']}")
    # New connections go back to the old release as the switch-back begins. Its end waits for
    # what the new forwarder still carries: the dead instance's socket holds those connections
    # until systemd restarts it, and they are served, not lost.
    assert switch_back - killed < 5
    # Requests failed only while the dead instance had the traffic.
    for failure in load.report["failures"]:
        assert killed - 0.5 <= failure["start"] <= record["finished_at"] + 0.5, failure
