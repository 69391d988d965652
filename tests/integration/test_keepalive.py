"""Keep-alive clients through deploys of gthread instances: none fails, none stays behind.
Four deploys here, ten in test_keepalive_stress.py (scripts/test --stress).

Busy clients (GET / and POST /echo back to back, bodies checked) and clients that think
0.3-2.5 s between requests hold their connections open, as browsers and HTTP libraries do
(tests/keepalive.py: a request on a reused connection the server closed before answering is
sent again once, nothing else is). Right after each switch the old instance gets its drain
flag and closes every connection after its next response, so:
  - no request fails;
  - every busy client is on the new release within 1 s of the first new connection reaching it;
  - with no long-lived response in flight, the old instance is left with no connection before
    drain_timeout (the first half of the deploys).
Long-lived responses (a stream longer than drain_timeout) cannot move: the second half of the
deploys runs two of them at all times, and the test prints how many each switch cut, and checks
that none was cut before drain_timeout.

A release that turns unhealthy after the switch sends traffic back to the old instance, which
then keeps connections alive again, while the failing one closes them.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    Load,
    call,
    deploy_new_release,
    properties,
    public,
    wait_deployment,
    wait_serving,
)
from tests.integration.test_zero_downtime import step_time
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

DEPLOYS = 10  # under the stress marker
QUICK_DEPLOYS = 4  # two without long-lived responses, two with
DRAIN_TIMEOUT = 10.0
STREAM_SECONDS = 6 * DRAIN_TIMEOUT  # as good as endless: any switch cuts them
MAX_LAG = 1.0


def config(watch: float = 3.0) -> str:
    """The module's settings, with a post-switch watch of ``watch`` seconds."""
    return (f"post_switch_watch = {watch:g}\ndrain_timeout = {DRAIN_TIMEOUT:g}\n"
            '[app]\nworkers = 2\nworker_class = "gthread"\n[health]\ninterval = 0.2\n')


CONFIG = config()
# gthread's default is one thread per worker: a stream would hold a whole worker.
THREADS = "[Service]\nEnvironment=GUNICORN_CMD_ARGS=--threads=8\n"


@pytest.fixture(scope="module")
def config_extra() -> str:
    return CONFIG


@pytest.fixture(scope="module")
def deploys() -> int:
    """Deploys in the keep-alive test: four in the default suite, ten under the stress marker
    (each forwarder's *_stress module)."""
    return QUICK_DEPLOYS


@pytest.fixture(scope="module")
def serving(box: Sandbox, app: App) -> App:
    """bluegreen serving the sample app's first release on gthread instances with 8 threads."""
    box.write("/etc/systemd/system/bluegreen-app@.service.d/threads.conf", THREADS)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "bluegreen.service")
    wait_serving(box)
    return app


class Clients(Load):
    """tests/keepalive.py (keep-alive clients) against the public port while the block runs."""

    SCRIPT = "tests/keepalive.py"


def first_start(report: dict[str, Any], version: str) -> float:
    """When a request first reached ``version`` (a new connection: nothing was kept to it)."""
    starts = [start for client in report["clients"]
              for seen, start, _end, _count in client["segments"] if seen == version]
    starts += [start for start, _end, outcome, seen, _size in report["streams"] if seen == version]
    assert starts, f"no client ever reached release {version}"
    return float(min(starts))


def test_keepalive_clients_move_at_once_and_fail_no_request(box: Sandbox, serving: App, deploys: int,
                                                            tmp_path: Path) -> None:
    app = serving
    records = []
    clients = Clients(box, "--busy", "6", "--thinkers", "4")
    streams = Clients(box, "--busy", "0", "--thinkers", "0", "--streams", "2",
                      "--stream-seconds", f"{STREAM_SECONDS:g}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(clients)
        for number in range(deploys):
            if number == deploys // 2:
                stack.enter_context(streams)
                time.sleep(2)  # both streams under way
            records.append(deploy_new_release(box, app, f"Release {number + 2}"))
    report = clients.report
    streamed = streams.report["streams"]
    report["streams"] = streamed
    saved = tmp_path / "keepalive.json"
    saved.write_text(json.dumps({"report": report, "records": records}))

    print(f"\nreport and records: {saved}")
    for slow in report["slow"]:
        print(f"slow request: {slow}")
    print(f"{report['requests']} requests ({report['requests_per_second']:.0f}/s), "
          f"{report['failed']} failed, {report['retried']} sent again on a new connection "
          f"({report['retried_ok']} then answered), {report['connections']} connections, "
          f"{report['connection_close_responses']} responses with Connection: close")
    busy = [client for client in report["clients"] if client["kind"] == "busy"]
    lags = []
    for number, record in enumerate(records):
        version = str(number + 2)
        drain = step_time(record, "drain")
        drained = step_time(record, "watch") - drain
        reached = first_start(report, version)
        moved = [[start for seen, start, _end, _count in client["segments"] if seen == version]
                 for client in busy]
        assert all(moved), f"a busy client never reached release {version}"
        lag = max(starts[0] - reached for starts in moved)
        lags.append(lag)
        # Streams the old release served across the switch (some began just after it, on a
        # connection the old forwarder accepted before its listener closed).
        old = [s for s in streamed if s[3] == str(number + 1) and s[0] < drain + 1 < s[1]]
        cut = [s for s in old if s[2] != "ok"]
        print(f"deploy {number + 1:2}: first new connection {reached - drain:+.3f} s from the drain "
              f"step, busy clients on the new release {lag:.3f} s after it, drain {drained:.2f} s, "
              f"long-lived responses on the old release {len(old)}, cut {len(cut)}"
              + "".join(f" ({s[1] - drain:.2f} s after the drain step)" for s in cut))

    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    assert report["requests"] > 1000
    for client in report["clients"]:  # each client saw the releases in order, never went back
        versions = [int(seen) for seen, *_ in client["segments"]]
        assert versions == sorted(set(versions)), (client["name"], client["segments"])
    assert max(lags) <= MAX_LAG, [f"{lag:.3f}" for lag in lags]
    for record in records[:deploys // 2]:  # nothing long-lived: the old instance emptied early
        assert step_time(record, "watch") - step_time(record, "drain") < DRAIN_TIMEOUT - 1, record
    drains = [step_time(record, "drain") for record in records]
    for start, end, outcome, version, _size in streamed:  # streams are cut at drain_timeout only
        if outcome not in ("ok", "stopped"):
            assert any(abs(end - drain - DRAIN_TIMEOUT) < 2 for drain in drains), \
                (start, end, outcome, version, drains)
    assert public(box)["version"] == str(app.version)
    assert ".drain" not in box.run("ls", "/run/bluegreen/instances").stdout


def souring(source: str) -> str:
    """The sample app, its health check failing 2.5 s after it started: only the watch sees it."""
    healthy = '@app.get("/health")\ndef health():\n'
    assert healthy in source
    return source.replace(healthy, "STARTED = time.monotonic()\n\n\n" + healthy
                          + '    if time.monotonic() - STARTED > 2.5:\n        return "sour", 500\n')


def keeps_alive(box: Sandbox) -> bool:
    """Whether three requests to the public port go on one connection."""
    url = "http://127.0.0.1:5000/"
    connects = box.net("curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                       "-w", "%{num_connects} ", url, url, url).stdout.split()
    return connects == ["1", "0", "0"]


def test_switch_back_keeps_connections_alive_again(box: Sandbox, serving: App) -> None:
    app = serving
    before = wait_serving(box)
    version = public(box)["version"]
    assert keeps_alive(box)
    original = (app.work / "app.py").read_text()
    sour = app.commit("Sours after the switch", {"app.py": souring(original), "VERSION": "sour\n"})
    with Clients(box, "--busy", "6", "--thinkers", "4") as clients:
        record = wait_deployment(box, call(box, "Deploy", "s", sour))
        time.sleep(1)
    app.commit("Back to the healthy app", {"app.py": original, "VERSION": f"{version}\n"})
    report = clients.report
    print(f"\nswitch back: {report['requests']} requests, {report['failed']} failed, "
          f"{report['connection_close_responses']} responses with Connection: close; releases "
          f"seen by each busy client: {[[s[0] for s in c['segments']] for c in report['clients']]}")
    assert record["state"] == "switched-back", record
    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    for client in report["clients"]:
        if client["kind"] == "busy":  # moved to the souring release, then back
            assert [s[0] for s in client["segments"]] == [version, "sour", version], client
    assert properties(box)["ActivePort"] == before["ActivePort"]
    assert keeps_alive(box)
    assert ".drain" not in box.run("ls", "/run/bluegreen/instances").stdout
