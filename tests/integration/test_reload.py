"""systemctl reload bluegreen: settings change without a restart; a broken file changes nothing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    configure,
    http,
    main_pid,
    properties,
    public,
    serving_app,
    settings,
    wait_for_commit,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

CONFIG = "/etc/bluegreen/bluegreen.toml"
# Deploys are quick: no watch, frequent health checks.
QUICK = {"drain_timeout": 2}
BASE = settings(0, top=QUICK)


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, BASE)


def reload(box: Sandbox) -> Any:
    return box.run("systemctl", "reload", "bluegreen.service", check=False)


def status(box: Sandbox) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(box.run("bluegreenctl", "status", "--json").stdout)
    return result


def instance_setting(box: Sandbox, port: int, name: str) -> str:
    for line in box.run("cat", f"/run/bluegreen/instances/{port}.env").stdout.splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip('"')
    raise AssertionError(f"{name} not in the settings of the instance on port {port}")


def test_a_reload_applies_some_settings_at_once_and_lists_the_rest_as_pending(
        box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    pid = main_pid(box, "bluegreen.service")
    assert before["Watching"] is False
    assert status(box)["PendingSettings"] == []
    configure(box, settings(0, workers=3, top=QUICK), repository="watch = true\npoll_interval = 1\n")

    assert reload(box).returncode == 0
    assert main_pid(box, "bluegreen.service") == pid  # no restart
    journal = box.journal("-u", "bluegreen.service", "-n", "20", "-o", "cat")
    assert "reload: app.workers changed; it applies at the next deploy" in journal
    assert "reload: repository.watch changed; it applies at once" in journal
    # At once: the refresher runs now, and deploys what is pushed.
    assert properties(box)["Watching"] is True
    # At the next deploy: the serving instance still runs with what it was deployed with.
    assert instance_setting(box, before["ActivePort"], "BLUEGREEN_WORKERS") == "2"
    pending = [{"key": "app.workers", "applies": "at the next deploy"}]
    assert status(box)["PendingSettings"] == pending
    assert "Pending:     app.workers (applies at the next deploy)" in box.run(
        "bluegreenctl", "status").stdout
    assert http(box, "GET", "/status").body["pending_settings"] == pending

    sha = app.commit("Deployed by the refresher the reload turned on")
    record = wait_for_commit(box, sha, timeout=60)
    assert (record["state"], record["trigger"]) == ("succeeded", "refresher"), record
    assert instance_setting(box, record["port"], "BLUEGREEN_WORKERS") == "3"
    assert status(box)["PendingSettings"] == []
    # A restarted controller knows what the serving release was deployed with.
    box.run("systemctl", "restart", "bluegreen.service")
    wait_serving(box)
    assert status(box)["PendingSettings"] == []


@pytest.mark.parametrize(("broken", "reason"), [
    ("[app]\nworkers = 4\n[health]\ninterval = = 1\n", ":4: health.interval: Invalid value"),
    ("[app]\nworkers = 4\n[health]\ninterval = 0\n", ":4: health.interval: must be between"),
])
def test_a_broken_file_fails_the_reload_and_changes_nothing(
        box: Sandbox, app: App, broken: str, reason: str) -> None:
    configure(box, settings(0, workers=3, top=QUICK), repository="watch = true\npoll_interval = 1\n")
    assert reload(box).returncode == 0
    before = wait_serving(box)
    pid = main_pid(box, "bluegreen.service")
    since = time.time()
    box.write(CONFIG, broken + "[repository]\nwatch = false\n")

    result = reload(box)
    assert result.returncode != 0
    refused = box.run("journalctl", "--no-pager", "-o", "cat", "-u", "bluegreen.service",
                      f"--since=@{since:.3f}").stdout
    assert f"bluegreenctl: {CONFIG}{reason}" in refused, refused
    assert box.run("bluegreenctl", "reload", check=False).returncode == 3
    # The daemon goes on as it was: same process, serving, still watching the branch.
    assert box.run("systemctl", "is-active", "bluegreen.service").stdout.strip() == "active"
    assert main_pid(box, "bluegreen.service") == pid
    assert public(box)["release"] == before["ActiveRelease"]
    assert properties(box)["Watching"] is True
    # The next deploy (the refresher's: watch is still on) uses the settings from before.
    sha = app.commit("Deployed with the settings from before the broken file")
    record = wait_for_commit(box, sha, timeout=60)
    assert record["state"] == "succeeded", record
    assert instance_setting(box, record["port"], "BLUEGREEN_WORKERS") == "3"


def test_a_new_api_listen_is_pending_until_the_socket_is_restarted(box: Sandbox, app: App) -> None:
    def api_listen() -> list[dict[str, str]]:
        return [setting for setting in status(box)["PendingSettings"] if setting["key"] == "api.listen"]

    pending = [{"key": "api.listen",
                "applies": "after systemctl daemon-reload && systemctl restart bluegreen-api.socket"}]
    configure(box, settings(0, top=QUICK, api={"listen": "127.0.0.1:5002"}))
    try:
        assert reload(box).returncode == 0
        assert api_listen() == pending
        box.run("systemctl", "daemon-reload")  # the socket says 5002 now, but listens nowhere
        assert api_listen() == pending
        box.run("systemctl", "restart", "bluegreen-api.socket")
        assert api_listen() == []
        assert http(box, "GET", "/health", port=5002).status == 200
    finally:
        configure(box, BASE)
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "bluegreen-api.socket")
        reload(box)
    assert api_listen() == []


def test_a_new_public_port_waits_for_the_next_deploy(box: Sandbox, app: App) -> None:
    configure(box, settings(0, top=QUICK, ports={"public": 5005}))
    assert reload(box).returncode == 0
    assert {"key": "ports.public", "applies": "at the next deploy"} in status(box)["PendingSettings"]
    assert properties(box)["PublicPort"] == 5000
    # Whatever restarts meanwhile (here the forwarder, killed) still listens on the old port.
    port = wait_serving(box)["ActivePort"]
    box.run("systemctl", "kill", "--signal=KILL", f"bluegreen-forward@{port}.service")
    deadline = time.monotonic() + 30
    while http(box, "GET", "/", port=5000).status != 200:
        assert time.monotonic() < deadline, "the forwarder did not come back on port 5000"
        time.sleep(0.2)

    sha = app.commit("Served on the new public port")
    assert json.loads(box.run("bluegreenctl", "deploy", "--json").stdout)["state"] == "succeeded"
    assert http(box, "GET", "/", port=5005).body["release"] == sha
    assert http(box, "GET", "/", port=5000).status == 0  # nothing listens there any more
    assert properties(box)["PublicPort"] == 5005
    assert "ports.public" not in {s["key"] for s in status(box)["PendingSettings"]}
