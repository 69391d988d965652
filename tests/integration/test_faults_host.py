"""Faults around the app: killed forwarders and instances, a stranger on a port, power loss."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.helpers import (
    THIEF,
    App,
    Load,
    call,
    deployment,
    http,
    properties,
    public,
    serving_app,
    settings,
    stranger_during_restart,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

# Three ports: the serving instance, the next one, and one for a stranger.
RANGE = "8000-8002"
GRAB_FLAG = "/etc/bluegreen-test-grab-next-port"
# Run by the instance's socket unit just before it binds the port.
GRAB = f"""[Socket]
ExecStartPre=/bin/sh -c 'if [ -e {GRAB_FLAG} ]; then rm {GRAB_FLAG}; \\
    systemd-run --unit=stranger-%i /usr/bin/python3 -m http.server --bind 127.0.0.1 %i; sleep 1; fi'
"""


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    def grabbing_drop_in() -> None:
        box.write("/etc/systemd/system/bluegreen-app@.socket.d/grab.conf", GRAB)
        box.run("systemctl", "daemon-reload")

    return serving_app(box, settings(1, workers=4, health={"timeout": 0.5}, ports={"range": RANGE}),
                       prepare=grabbing_drop_in)


def wait_back(box: Sandbox, since: float, timeout: float = 30) -> float:
    """Seconds from ``since`` until port 5000 answers again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http(box, "GET", "/", port=5000).status == 200:
            return time.time() - since
        time.sleep(0.02)
    raise AssertionError("port 5000 did not answer again")


@pytest.mark.parametrize("kind", ["forward", "app"])
def test_a_killed_forwarder_or_instance_comes_back(box: Sandbox, app: App, kind: str) -> None:
    props = wait_serving(box)
    unit = f"bluegreen-{kind}@{props['ActivePort']}.service"
    with Load(box, "--fast", "3", "--slow", "0") as load:
        time.sleep(1)
        killed = time.time()
        box.run("systemctl", "kill", "--signal=SIGKILL", unit)
        time.sleep(0.05)
        back = wait_back(box, killed)
        time.sleep(1)
    report = load.report
    print(f"\n{unit} killed: port 5000 answered again after {back:.2f} s; "
          f"{report['failed']} of {report['requests']} requests failed {report['failures_by_kind']}, "
          f"longest gap between successes {report['longest_gap']:.2f} s")
    assert back < 10
    wait_serving(box, timeout=60)
    assert public(box)["release"] == props["ActiveRelease"]
    for failure in report["failures"]:
        assert killed - 0.1 <= failure["start"] <= killed + back + 1, failure


def test_a_restarting_instance_keeps_its_port_from_strangers(box: Sandbox, app: App) -> None:
    """gunicorn dies; while systemd restarts it (RestartSec=), no other user can take its port
    and have the public port's traffic carried to it."""
    props = wait_serving(box)
    port, unit = props["ActivePort"], f"bluegreen-app@{props['ActivePort']}.service"
    answers: list[object] = []
    with ThreadPoolExecutor(1) as pool:
        thief = pool.submit(box.run, "/usr/bin/python3", "-c", THIEF, str(port), "5", "4",
                            user="nobody", timeout=60)
        time.sleep(0.5)  # it is trying
        box.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", unit)
        until = time.monotonic() + 4
        while time.monotonic() < until:
            answers.append(http(box, "GET", "/", port=5000).body)
        outcome = json.loads(thief.result().stdout)
    stolen = [answer for answer in answers if isinstance(answer, dict) and "stranger" in answer]
    failed = [answer for answer in answers if not isinstance(answer, dict)]
    print(f"\nanother user tried to bind port {port} while {unit} restarted: {outcome}; "
          f"{len(answers)} requests to port 5000 meanwhile, {len(stolen)} answered by it, "
          f"{len(failed)} failed")
    assert not outcome["bound"] and outcome["error"] == "EADDRINUSE", outcome
    assert not stolen
    # The restarted instance serves the public port again (the requests begun while gunicorn's
    # workers were being killed may fail).
    assert isinstance(answers[-1], dict) and answers[-1].get("release") == props["ActiveRelease"]
    wait_serving(box, timeout=60)
    assert public(box)["release"] == props["ActiveRelease"]


def test_a_restarting_forwarder_keeps_the_public_port_from_strangers(box: Sandbox, app: App) -> None:
    """socat, the only forwarder, dies; while systemd restarts it, no other user can take the
    public port, and the connections that come meanwhile wait for the new socat."""
    props = wait_serving(box)
    unit = f"bluegreen-forward@{props['ActivePort']}.service"
    outcome, stolen, failed = stranger_during_restart(box, unit, 5000)
    assert not outcome["bound"] and outcome["error"] == "EADDRINUSE", outcome
    assert not stolen
    # One request can be in a socat child the kill stops; none meets a closed port.
    assert len(failed) <= 1, failed
    journal = box.run("journalctl", "-u", unit, "-o", "cat", "--since", "-1min").stdout
    print(journal)
    assert "the listener kept through the restart" in journal
    wait_serving(box, timeout=60)
    assert public(box)["release"] == props["ActiveRelease"]


def test_a_port_held_by_a_stranger_is_never_used(box: Sandbox, app: App) -> None:
    props = wait_serving(box)
    free = [port for port in range(8000, 8003) if port != props["ActivePort"]]
    stranger = free[0]
    box.run("systemd-run", "--unit=stranger", "/usr/bin/python3", "-m", "http.server", "--bind",
            "127.0.0.1", str(stranger))
    try:
        time.sleep(1)
        app.commit("Beside a stranger")
        record = wait_deployment(box, call(box, "Deploy", "s", ""))
        assert record["state"] == "succeeded", record
        assert record["port"] == free[1]
        assert "GET" not in box.journal("-u", "stranger.service", "-o", "cat")
    finally:
        box.run("systemctl", "stop", "stranger.service", check=False)


def test_a_port_grabbed_before_its_socket_binds_it_is_given_up(box: Sandbox, app: App) -> None:
    wait_serving(box)
    box.write(GRAB_FLAG, "")
    app.commit("Its first port is stolen")
    with Load(box, "--fast", "2", "--slow", "1") as load:
        record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert record["state"] == "succeeded", record
    strangers = box.run("systemctl", "list-units", "--plain", "--no-legend", "stranger-*").stdout.split()
    assert strangers, "the drop-in did not grab a port"
    grabbed = int(strangers[0].split("-")[1].split(".")[0])
    try:
        assert record["port"] != grabbed
        assert "was taken by another program" in box.journal("-u", "bluegreen.service", "-o", "cat")
        assert "GET" not in box.journal("-u", strangers[0], "-o", "cat")
        assert load.report["failed"] == 0
    finally:
        box.run("systemctl", "stop", strangers[0], check=False)


def test_after_a_power_loss_mid_deploy_the_last_good_release_serves(box: Sandbox, app: App) -> None:
    good = wait_serving(box)["ActiveRelease"]
    app.commit("Interrupted by a power loss")
    deploying = call(box, "Deploy", "s", "")
    deadline = time.monotonic() + 30
    while deployment(box, deploying)["steps"][-1][0] not in ("start", "health"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    box.power_cycle()
    props = wait_serving(box, timeout=90)
    assert props["ActiveRelease"] == good
    assert public(box)["release"] == good
    assert deployment(box, deploying)["state"] == "interrupted"
    last = deployment(box, props["LastDeployment"])
    assert (last["trigger"], last["state"], last["commit"]) == ("startup", "succeeded", good)
    running = box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                      "bluegreen-app@*.service", "bluegreen-forward@*").stdout.split("\n")
    assert len([line for line in running if line.strip()]) == 2
    assert properties(box)["Healthy"]
