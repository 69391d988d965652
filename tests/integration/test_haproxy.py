"""The HAProxy forwarder (forwarder = "haproxy"): switched over its runtime API, rebuilt from
what runs after a restart, the forwarded headers its own."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    Load,
    clone_instance,
    configure,
    deploy_new_release,
    http,
    main_pid,
    properties,
    public,
    serving_app,
    settings,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

UNIT = "bluegreen-haproxy.service"


def haproxy_settings(drain_timeout: float = 5, **ports: int) -> str:
    return settings(0, forwarder="haproxy", interval=None, top={"drain_timeout": drain_timeout},
                    ports=ports)


CONFIG = haproxy_settings()


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, CONFIG)


def runtime_api(box: Sandbox, command: str) -> str:
    return box.sh(f"echo '{command}' | socat - UNIX-CONNECT:/run/bluegreen/haproxy.sock").stdout


def servers(box: Sandbox) -> dict[str, int]:
    """haproxy's servers: name -> admin state (0: takes requests)."""
    lines = runtime_api(box, "show servers state app").splitlines()
    return {fields[3]: int(fields[6]) for fields in (line.split() for line in lines[2:]) if fields}


def test_haproxy_serves_and_a_deploy_switches_its_server(box: Sandbox, app: App) -> None:
    first = properties(box)["ActivePort"]
    assert box.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert servers(box) == {f"p{first}": 0}
    # The runtime API is root's alone.
    assert box.run("stat", "-c", "%U %a", "/run/bluegreen/haproxy.sock").stdout.split() == ["root", "600"]
    assert box.run("socat", "-", "UNIX-CONNECT:/run/bluegreen/haproxy.sock", user="nobody",
                   check=False, input="show info\n").returncode != 0
    pid = main_pid(box, UNIT)

    deploy_new_release(box, app, "Another release")
    second = properties(box)["ActivePort"]
    assert second != first
    assert servers(box) == {f"p{second}": 0}
    assert public(box)["version"] == str(app.version)
    # No reload, no restart: the same haproxy switched.
    assert main_pid(box, UNIT) == pid
    assert box.run("systemctl", "is-active", f"bluegreen-app@{first}.service",
                   check=False).stdout.strip() == "inactive"
    # What a restarted haproxy would serve.
    assert f"server p{second} 127.0.0.1:{second}" in box.run(
        "cat", "/run/bluegreen/haproxy-serving.cfg").stdout


def test_a_restarted_haproxy_serves_the_serving_instance_at_once(box: Sandbox, app: App) -> None:
    port = properties(box)["ActivePort"]
    killed = main_pid(box, UNIT)
    # systemd may report an error for a worker that dies of the master's death meanwhile
    # ("Failed to send signal SIGKILL to auxiliary processes"): the wait below tells.
    box.run("systemctl", "kill", "--signal=KILL", UNIT, check=False)
    deadline = time.monotonic() + 30
    # Restarted: another main process, active (right after the kill it may still say active).
    while (main_pid(box, UNIT) in (killed, 0)
           or box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"):
        assert time.monotonic() < deadline, box.journal("-u", UNIT, "-n", "30")
        time.sleep(0.1)
    assert public(box)["version"] == str(app.version)
    assert servers(box) == {f"p{port}": 0}
    deploy_new_release(box, app, "Another release")  # and the controller switches it as before
    assert servers(box) == {f"p{properties(box)['ActivePort']}": 0}


def test_a_restarted_controller_rebuilds_the_state_from_haproxy(box: Sandbox, app: App) -> None:
    port = properties(box)["ActivePort"]
    pid = main_pid(box, UNIT)
    box.run("systemctl", "restart", "bluegreen.service")
    assert wait_serving(box)["ActivePort"] == port
    assert main_pid(box, UNIT) == pid
    assert servers(box) == {f"p{port}": 0}
    deploy_new_release(box, app, "Another release")
    assert servers(box) == {f"p{properties(box)['ActivePort']}": 0}


def test_a_controller_that_died_during_a_drain_finishes_it(box: Sandbox, app: App) -> None:
    """Both servers in haproxy, the old one draining: the restarted controller keeps the new
    one and retires the old one, whose instance it stops."""
    port = properties(box)["ActivePort"]
    box.run("systemctl", "stop", "bluegreen.service")
    old = port + 1 if port < 8999 else port - 1
    clone_instance(box, port, old, BLUEGREEN_DEPLOYMENT_ID="1")
    runtime_api(box, f"add server app/p{old} 127.0.0.1:{old}")
    runtime_api(box, f"set server app/p{old} state drain")
    assert servers(box) == {f"p{port}": 0, f"p{old}": 8}
    box.run("systemctl", "start", "bluegreen.service")
    assert wait_serving(box)["ActivePort"] == port
    assert servers(box) == {f"p{port}": 0}
    assert box.run("systemctl", "is-active", f"bluegreen-app@{old}.service",
                   check=False).stdout.strip() == "inactive"


def seen(box: Sandbox, host: str, *headers: str) -> dict[str, Any]:
    result = box.net("curl", "-sf", "-g", "--max-time", "10", *headers, f"http://{host}:5000/request")
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_the_app_sees_the_client_haproxy_saw_whatever_it_claims(box: Sandbox, app: App) -> None:
    # A client from another address than haproxy's own to the instances (127.0.0.1).
    box.net("ip", "addr", "add", "192.0.2.7/32", "dev", "lo")
    lies = ("-H", "X-Forwarded-Proto: https", "-H", "X-Forwarded-For: 203.0.113.9")
    assert seen(box, "192.0.2.7", *lies) == {
        "scheme": "http", "remote_addr": "127.0.0.1", "forwarded_for": ["192.0.2.7"]}
    assert seen(box, "[::1]", *lies)["forwarded_for"] == ["::1"]
    # gunicorn believes haproxy, and haproxy alone (it set X-Forwarded-Proto: http above).
    port = properties(box)["ActivePort"]
    env = box.run("cat", f"/run/bluegreen/instances/{port}.env").stdout
    assert 'BLUEGREEN_FORWARDED_ALLOW_IPS="127.0.0.1"\n' in env


def settings_digest(box: Sandbox) -> str:
    """The description of the settings the running haproxy has (show info)."""
    info = dict(line.split(": ", 1) for line in runtime_api(box, "show info").splitlines() if ": " in line)
    return info["description"]


def haproxy_processes(box: Sandbox) -> list[str]:
    return box.run("pgrep", "-x", "haproxy").stdout.split()


def test_new_settings_reach_haproxy_by_a_reload_at_the_next_switch(box: Sandbox, app: App) -> None:
    """A longer drain_timeout, then another public port: each takes a reload of haproxy at the
    next deploy, under load, with a slow request in flight at the switch."""
    pid = main_pid(box, UNIT)
    before = settings_digest(box)
    configure(box, haproxy_settings(drain_timeout=8))
    box.run("systemctl", "reload", "bluegreen.service")
    assert settings_digest(box) == before  # nothing changes before the deploy
    old = properties(box)["ActivePort"]
    with Load(box, "--fast", "4", "--slow", "2", "--slow-seconds", "3") as load:
        deploy_new_release(box, app, "New drain timeout")
    report = load.report
    print(f"\n{report['requests']} requests, {report['failed']} failed, slow: "
          f"{[s['outcome'] for s in report['slow']]}")
    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    assert report["slow"] and all(s["outcome"] == "ok" for s in report["slow"]), report["slow"]
    assert main_pid(box, UNIT) == pid  # reloaded
    after = settings_digest(box)
    assert after != before
    assert f"description {after}" in box.run("cat", "/run/bluegreen/haproxy.cfg").stdout
    assert "hard-stop-after 8s" in box.run("cat", "/run/bluegreen/haproxy.cfg").stdout
    assert len(haproxy_processes(box)) == 2  # the master and its new worker: the old one is done
    assert box.run("systemctl", "is-active", f"bluegreen-app@{old}.service",
                   check=False).stdout.strip() == "inactive"
    assert "reloading bluegreen-haproxy.service for its new settings" in box.journal(
        "-u", "bluegreen.service", "-n", "100")

    try:
        configure(box, haproxy_settings(public=5050))
        box.run("systemctl", "reload", "bluegreen.service")
        deploy_new_release(box, app, "Another public port")
        moved = http(box, "GET", "/", port=5050)
        assert moved.status == 200 and moved.body["version"] == str(app.version), moved
        assert box.net("curl", "-s", "--max-time", "5", "http://127.0.0.1:5000/", check=False).returncode == 7
        assert main_pid(box, UNIT) == pid
    finally:
        configure(box, CONFIG)
        box.run("systemctl", "reload", "bluegreen.service")
    deploy_new_release(box, app, "Back on port 5000")
    assert public(box)["version"] == str(app.version)
