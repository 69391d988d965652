"""The tests every forwarder passes, through consecutive deploys under load. Each forwarder kind
has a module of its own (test_forwarder_socat.py, _proxy, _haproxy) with a subclass of
ForwarderSuite, so that its tests share one container and the kinds run in parallel.

Each test runs two deploys in the default suite and ten under the stress marker
(scripts/test --stress), on the same container: four forwarders run the suite, and the default
suite must stay short.

No request is lost during a deploy (test_deploys_under_load_fail_no_request): load and slow
requests through the deploys, a slow request in flight at every switch.

Keep-alive clients through deploys of gthread instances: none fails, none stays behind
(test_keepalive_clients_move_at_once_and_fail_no_request). Busy clients (GET / and POST /echo
back to back, bodies checked) and clients that think 0.3-2.5 s between requests hold their
connections open, as browsers and HTTP libraries do (tests/keepalive.py: a request on a reused
connection the server closed before answering is sent again once, nothing else is). Right after
each switch the old instance gets its drain flag and closes every connection after its next
response, so:
  - no request fails;
  - every busy client is on the new release within 1 s of the first new connection reaching it;
  - with no long-lived response in flight, the old instance is left with no connection before
    drain_timeout (the first half of the deploys).
Long-lived responses (a stream longer than drain_timeout) cannot move: the second half of the
deploys runs two of them at all times, and the test prints how many each switch cut, and checks
that none was cut before drain_timeout.

A release that turns unhealthy after the switch sends traffic back to the old instance, which
then keeps connections alive again, while the failing one closes them
(test_switch_back_keeps_connections_alive_again).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.integration.helpers import (
    App,
    Load,
    call,
    configure,
    deploy_new_release,
    forwarder_unit,
    properties,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

QUICK_DEPLOYS = 2  # the default suite; the keep-alive test: one without long-lived responses, one with
STRESS_DEPLOYS = 10
DEPLOYS = pytest.mark.parametrize("deploys", [
    pytest.param(QUICK_DEPLOYS, id=f"{QUICK_DEPLOYS}-deploys"),
    pytest.param(STRESS_DEPLOYS, id=f"{STRESS_DEPLOYS}-deploys", marks=pytest.mark.stress),
])
SLOW_SECONDS = 3.0
DRAIN_TIMEOUT = 10.0
STREAM_SECONDS = 6 * DRAIN_TIMEOUT  # as good as endless: any switch cuts them
MAX_LAG = 1.0
# gthread's default is one thread per worker: a stream would hold a whole worker.
THREADS_DROP_IN = "/etc/systemd/system/bluegreen-app@.service.d/threads.conf"
THREADS = "[Service]\nEnvironment=GUNICORN_CMD_ARGS=--threads=8\n"


def serve(box: Sandbox, app: App, text: str, threads: bool) -> App:
    """bluegreen serving ``app`` with the settings ``text`` (and gunicorn's threads drop-in or
    not): written, the controller restarted and a release deployed with them, unless they are
    in force already. The tests of a container share it in whatever order they run."""
    config = box.path("/etc/bluegreen/bluegreen.toml")
    active = box.run("systemctl", "is-active", "bluegreen.service", check=False).stdout.strip() == "active"
    current = config.read_text() if config.exists() else ""
    configure(box, text)
    if active and config.read_text() == current and box.exists(THREADS_DROP_IN) == threads:
        return app
    if threads:
        box.write(THREADS_DROP_IN, THREADS)
    else:
        box.run("rm", "-f", THREADS_DROP_IN)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "bluegreen.service")
    wait_serving(box)
    if active:  # the instance serving was started with the old settings
        record = wait_deployment(box, call(box, "Deploy", "s", ""))
        assert record["state"] == "succeeded", record
        wait_serving(box)
    return app


def step_time(record: dict[str, Any], name: str) -> float:
    for step, started, _finished in record["steps"]:
        if step == name:
            return float(started)
    raise AssertionError(f"deployment {record['id']} has no step {name}: {record['steps']}")


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


class ForwarderSuite:
    """The tests, for the forwarder ``FORWARDER``; a subclass named Test... collects them.

    The keep-alive tests come first, on the freshly started controller: with the built-in
    forwarder, after the zero-downtime test's deploys and the controller's restart onto other
    settings, new connections reached the new instance up to 1.7 s before the drain step in 3
    of 8 deploys, and the keep-alive test's 1-s lag failed; on a fresh container they never
    did. The haproxy module's own keep-alive test comes after the rest, at the cost of one more
    restart onto its settings."""

    FORWARDER: ClassVar[str]
    KEEPALIVE_WATCH: ClassVar[float] = 3.0  # post_switch_watch of the keep-alive tests

    @pytest.fixture(scope="class")
    def sample(self, box: Sandbox) -> App:
        """The sample app in a local git repository, bluegreen's repository."""
        application = App(box)
        application.create()
        return application

    @pytest.fixture
    def under_load(self, box: Sandbox, sample: App) -> App:
        """bluegreen serving the sample app on four sync workers: the two slow-request threads
        must not starve the fast ones."""
        return serve(box, sample, settings(1, forwarder=self.FORWARDER, workers=4), threads=False)

    @pytest.fixture
    def serving(self, box: Sandbox, sample: App) -> App:
        """bluegreen serving the sample app on gthread instances with 8 threads."""
        text = settings(self.KEEPALIVE_WATCH, forwarder=self.FORWARDER, workers=2,
                        top={"drain_timeout": DRAIN_TIMEOUT}, app={"worker_class": "gthread"})
        return serve(box, sample, text, threads=True)

    @DEPLOYS
    def test_keepalive_clients_move_at_once_and_fail_no_request(self, box: Sandbox, serving: App,
                                                                deploys: int, tmp_path: Path) -> None:
        app = serving
        first = app.version + 1  # the release of the first deploy
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
                records.append(deploy_new_release(box, app, f"Release {first + number}"))
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
            version = str(first + number)
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
            old = [s for s in streamed if s[3] == str(first + number - 1) and s[0] < drain + 1 < s[1]]
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

    def test_switch_back_keeps_connections_alive_again(self, box: Sandbox, serving: App) -> None:
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

    @DEPLOYS
    def test_deploys_under_load_fail_no_request(self, box: Sandbox, under_load: App, deploys: int) -> None:
        app = under_load
        port = wait_serving(box)["ActivePort"]
        assert box.run("systemctl", "is-active", forwarder_unit(box, port)).stdout.strip() == "active"
        records = []
        with Load(box, "--fast", "4", "--slow", "2", "--slow-seconds", str(SLOW_SECONDS)) as load:
            for _ in range(deploys):
                records.append(deploy_new_release(box, app, f"Release {app.version + 1}"))
        report = load.report
        slow = report["slow"]
        print(f"\n{report['requests']} requests ({report['requests_per_second']:.0f}/s), "
              f"{report['failed']} failed, {len(slow)} slow requests, "
              f"longest gap between successes {report['longest_gap'] * 1000:.1f} ms, "
              f"deploys took {min(r['finished_at'] - r['started_at'] for r in records):.2f}-"
              f"{max(r['finished_at'] - r['started_at'] for r in records):.2f} s")

        assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
        assert report["requests"] > 100 * deploys
        assert all(s["outcome"] == "ok" for s in slow), [s for s in slow if s["outcome"] != "ok"]
        # Every switch happened with a slow request in flight, and that request completed with 200.
        for record in records:
            switch = step_time(record, "drain")  # the old forwarder closes its listener here
            spanning = [s for s in slow if s["start"] < switch < s["end"]]
            assert spanning, f"no slow request was in flight at the switch of deployment {record['id']}"
            assert all(s["outcome"] == "ok" for s in spanning)
        # Clients saw every release, and the last one serves.
        assert len(report["versions"]) == deploys + 1, report["versions"]
        assert public(box)["version"] == str(app.version)
