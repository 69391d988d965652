"""Slow clients: a request's headers dribbled byte by byte, on as many connections as the
instance has sync workers. Through a TCP forwarder (socat) each such connection holds a worker
until gunicorn's timeout kills it: the app answers nobody meanwhile. HAProxy reads the headers
itself (timeout http-request) and hands a worker a request only once they are all in.

The same module then moves the public port from socat to haproxy at a deploy under no load."""

from __future__ import annotations

import time

import pytest

from tests.integration.helpers import (
    App,
    call,
    configure,
    properties,
    serving_app,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

WORKERS = 2
CONFIG = settings(0, workers=WORKERS, interval=None)
HOLD = 20  # seconds the slow clients dribble, under gunicorn's 30 s worker timeout

# argv[1] connections, each sending a request's headers one byte at a time, a byte every 0.5 s,
# for argv[2] seconds.
SLOWLORIS = """\
import socket, sys, time
count, seconds = int(sys.argv[1]), float(sys.argv[2])
sockets = [socket.create_connection(("127.0.0.1", 5000)) for _ in range(count)]
headers = b"GET / HTTP/1.1\\r\\nHost: x\\r\\n" + b"X-Slow: " + b"a" * 10000
end = time.monotonic() + seconds
for byte in range(len(headers)):
    if time.monotonic() > end:
        break
    for sock in sockets:
        try:
            sock.send(headers[byte:byte + 1])
        except OSError:
            pass
    time.sleep(0.5)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, CONFIG)


def answer_time(box: Sandbox) -> float | None:
    """Seconds a normal request to the public port takes while slow clients hold on (None: no
    answer within 8 s)."""
    slow = box.popen_net(["/usr/bin/python3", "-c", SLOWLORIS, str(WORKERS), str(HOLD)])
    try:
        time.sleep(3)  # every slow connection accepted, its first bytes sent
        started = time.monotonic()
        result = box.net("curl", "-sf", "-o", "/dev/null", "--max-time", "8",
                         "http://127.0.0.1:5000/", check=False)
        assert result.returncode in (0, 28), result.stderr  # answered, or no answer in time
        return time.monotonic() - started if result.returncode == 0 else None
    finally:
        slow.kill()
        slow.wait()


def redeploy(box: Sandbox, app: App, forwarder: str | None = None) -> None:
    wait_serving(box)  # the stalled app may have been redeployed by the health monitor
    configure(box, settings(0, forwarder=forwarder, workers=WORKERS, interval=None))
    box.run("systemctl", "reload", "bluegreen.service")
    record = wait_deployment(box, call(box, "Deploy", "s", app.commit("Next release")))
    assert record["state"] == "succeeded", record


def test_slow_clients_stall_the_app_through_socat(box: Sandbox, app: App) -> None:
    assert box.run("systemctl", "is-active", f"bluegreen-forward@{properties(box)['ActivePort']}"
                   ".service").stdout.strip() == "active"
    assert answer_time(box) is None


def test_a_deploy_moves_the_public_port_from_socat_to_haproxy(box: Sandbox, app: App) -> None:
    old = properties(box)["ActivePort"]
    redeploy(box, app, forwarder="haproxy")
    new = properties(box)["ActivePort"]
    assert box.run("systemctl", "is-active", "bluegreen-haproxy.service").stdout.strip() == "active"
    assert box.run("systemctl", "is-active", f"bluegreen-forward@{old}.service",
                   check=False).stdout.strip() == "inactive"
    listening = box.net("ss", "-Hltnp", "sport = :5000").stdout
    assert "haproxy" in listening and "socat" not in listening, listening
    assert box.run("systemctl", "is-active", f"bluegreen-app@{new}.service").stdout.strip() == "active"
    assert box.net("curl", "-sf", "http://127.0.0.1:5000/").returncode == 0


def test_slow_clients_do_not_stall_the_app_through_haproxy(box: Sandbox, app: App) -> None:
    seconds = answer_time(box)
    print(f"\nthrough haproxy, with {WORKERS} slow clients: answered in {seconds} s")
    assert seconds is not None, seconds  # within curl's 8 s; how soon is a figure, printed above


def test_back_to_socat(box: Sandbox, app: App) -> None:
    redeploy(box, app)
    port = properties(box)["ActivePort"]
    assert box.run("systemctl", "is-active", f"bluegreen-forward@{port}.service").stdout.strip() == "active"
    assert box.run("systemctl", "is-active", "bluegreen-haproxy.service",
                   check=False).stdout.strip() == "inactive"
    assert box.net("curl", "-sf", "http://127.0.0.1:5000/").returncode == 0
