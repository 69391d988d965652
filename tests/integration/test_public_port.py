"""The public port: where the forwarder listens, how many connections it takes at once, and
what the app believes of the X-Forwarded-* headers clients send."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    call,
    configure,
    main_pid,
    properties,
    serving_app,
    settings,
    stranger_during_restart,
    wait_deployment,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

EXTRA = settings(0, interval=None)
# What any client can send: a scheme and a client address of its choosing.
LIES = ["-H", "X-Forwarded-Proto: https", "-H", "X-Forwarded-Ssl: on",
        "-H", "X-Forwarded-For: 203.0.113.9"]


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, EXTRA)


def seen(box: Sandbox, host: str, headers: list[str] | None = None) -> dict[str, Any] | None:
    """What the app believes about a request to the public port on ``host`` (None: refused)."""
    result = box.net("curl", "-s", "-g", "--max-time", "10", *(headers or []),
                     f"http://{host}:5000/request", check=False)
    if result.returncode == 7:  # connection refused
        return None
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return {key: answer[key] for key in ("scheme", "remote_addr")}


def forwarder_argv(box: Sandbox, unit: str) -> list[str]:
    pid = main_pid(box, unit)
    assert pid != 0, unit
    return box.run("cat", f"/proc/{pid}/cmdline").stdout.split("\0")


def redeploy_with(box: Sandbox, app: App, text: str) -> int:
    configure(box, text)
    box.run("systemctl", "restart", "bluegreen.service")
    app.commit("Another release, with new settings")
    record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert record["state"] == "succeeded", record
    port: int = properties(box)["ActivePort"]
    return port


def test_by_default_the_app_believes_no_forwarded_header(box: Sandbox, app: App) -> None:
    assert seen(box, "127.0.0.1", LIES) == {"scheme": "http", "remote_addr": "127.0.0.1"}


def test_by_default_the_forwarder_listens_on_both_stacks_with_a_connection_limit(
        box: Sandbox, app: App) -> None:
    assert seen(box, "127.0.0.1") is not None
    assert seen(box, "[::1]") == {"scheme": "http", "remote_addr": "127.0.0.1"}
    argv = forwarder_argv(box, f"bluegreen-forward@{properties(box)['ActivePort']}.service")
    assert any(arg.startswith("TCP6-LISTEN:5000,ipv6-v6only=0,") and arg.endswith(",max-children=1024")
               for arg in argv), argv


def test_behind_a_tls_proxy_the_admin_opts_in(box: Sandbox, app: App) -> None:
    port = redeploy_with(box, app, settings(0, interval=None, app={"forwarded_allow_ips": "127.0.0.1"},
                                            ports={"public_address": "127.0.0.1", "max_connections": 64}))
    assert seen(box, "127.0.0.1", LIES) == {"scheme": "https", "remote_addr": "127.0.0.1"}
    assert seen(box, "[::1]") is None  # only the proxy on this host reaches the public port
    argv = forwarder_argv(box, f"bluegreen-forward@{port}.service")
    assert any(arg.startswith("TCP4-LISTEN:5000,bind=127.0.0.1,") and arg.endswith(",max-children=64")
               for arg in argv), argv


def test_the_builtin_forwarder_listens_where_told(box: Sandbox, app: App) -> None:
    port = redeploy_with(box, app, settings(0, forwarder="proxy", interval=None,
                                            ports={"public_address": "127.0.0.1"}))
    assert seen(box, "127.0.0.1", LIES) == {"scheme": "http", "remote_addr": "127.0.0.1"}
    assert seen(box, "[::1]") is None
    assert forwarder_argv(box, f"bluegreen-proxy@{port}.service")[2] == "bluegreen.forwarders.proxy"
    redeploy_with(box, app, settings(0, forwarder="proxy", interval=None))
    assert seen(box, "[::1]") is not None and seen(box, "127.0.0.1") is not None


def test_a_restarting_builtin_forwarder_keeps_the_public_port_from_strangers(
        box: Sandbox, app: App) -> None:
    """The built-in forwarder, the only one, dies; the next one takes its listener over from
    the unit's file descriptor store: no other user can take the port meanwhile, and the
    connections that come wait for it."""
    port = redeploy_with(box, app, settings(0, forwarder="proxy", interval=None))
    unit = f"bluegreen-proxy@{port}.service"
    outcome, stolen, failed = stranger_during_restart(box, unit, 5000)
    assert not outcome["bound"] and outcome["error"] == "EADDRINUSE", outcome
    assert not stolen
    assert len(failed) <= 1, failed  # the one the proxy was carrying at the kill, if any
    assert box.run("systemctl", "show", "-P", "NRestarts", unit).stdout.strip() == "1"
    redeploy_with(box, app, EXTRA)


def test_a_port_served_on_ipv4_alone_stays_there_until_an_address_is_named(
        box: Sandbox, app: App) -> None:
    """As after an upgrade from forwarders that listened on 0.0.0.0: moving to "::" unasked
    would put the new listener in another SO_REUSEPORT group, where the connections queued on
    the old one cannot follow."""
    redeploy_with(box, app, settings(0, interval=None, ports={"public_address": "0.0.0.0"}))
    assert seen(box, "[::1]") is None
    redeploy_with(box, app, EXTRA)
    assert seen(box, "[::1]") is None and seen(box, "127.0.0.1") is not None
    assert "stays on 0.0.0.0" in box.journal("-u", "bluegreen.service", "--grep", "stays on")
    redeploy_with(box, app, settings(0, interval=None, ports={"public_address": "::"}))
    assert seen(box, "[::1]") is not None and seen(box, "127.0.0.1") is not None


def test_nothing_else_listens_on_the_public_port(box: Sandbox, app: App) -> None:
    listening = subprocess.run(["nsenter", "-t", str(box.leader), "-n", "ss", "-Hltn", "sport = :5000"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listening) == 1, listening  # the old forwarders are gone, whatever their address
