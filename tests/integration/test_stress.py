"""Stress: many forwarder switches under a connection-per-request load, every failure counted.

A switch here is what a deploy does to the public port, without the rest of the deploy:
start the forwarder to the other instance (both listen, SO_REUSEPORT), wait for its listener,
stop the old forwarder (its drain). Two instances of the sample app serve throughout; the
controller is stopped so that nothing else touches the units. wrk opens a new TCP connection
for every request (``Connection: close``, gunicorn's sync worker) and counts every connection
that is refused, reset, closed before a whole response, or answered with a non-2xx.

A race that loses one connection in tens of thousands needs this many switches under this much
load to show: the socat forwarder's SIGTERM drain did (a reset whenever the signal landed
between socat's accept() and its fork()). Marker ``stress``: the default run skips it;
``scripts/test --stress`` runs it (a few minutes per forwarder).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import serving_app, wait_serving
from tests.sandbox import Sandbox

pytestmark = [pytest.mark.integration, pytest.mark.stress]

SWITCHES = int(os.environ.get("BLUEGREEN_STRESS_SWITCHES", "100"))
MIN_CONNECTIONS_PER_SECOND = 1000
PUBLIC_PORT = 5000
WRK = ("-t2", "-c24", "--timeout", "10s")

# wrk's own counters, as JSON on the last line of its output.
WRK_REPORT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "latency_p99_us": %d, "latency_max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(99), latency.max))
end
"""

# Runs inside the container: the switches, as fast as systemd does them. Prints one JSON line
# per switch: when it began, when the new listener was there, when the old unit had stopped,
# and how the old unit ended.
SWITCHER = """\
import json, subprocess, sys, time
from bluegreen import netstat

kind = sys.argv[1]
old, new, count, public = (int(arg) for arg in sys.argv[2:6])
unit = ("bluegreen-forward@{}.service" if kind == "socat" else "bluegreen-proxy@{}.service").format

def systemctl(*args):
    return subprocess.run(["systemctl", *args], check=True, capture_output=True, text=True).stdout

for number in range(count):
    before = {s.inode for s in netstat.listeners(public)}
    begin = time.time()
    systemctl("start", unit(new))
    deadline = time.monotonic() + 10
    while not {s.inode for s in netstat.listeners(public)} - before:
        if time.monotonic() > deadline:
            sys.exit(f"{unit(new)} does not listen after 10 s")
        time.sleep(0.002)
    listening = time.time()
    systemctl("stop", unit(old))
    stopped = time.time()
    show = dict(line.split("=", 1) for line in systemctl(
        "show", "-p", "ActiveState,Result,ExecMainStatus,NRestarts", unit(old)).split())
    print(json.dumps({"begin": begin, "listening": listening, "stopped": stopped, **show}), flush=True)
    old, new = new, old
"""


def shell(box: Sandbox, script: str) -> str:
    return box.sh(script).stdout.strip()


def answers(box: Sandbox, port: int) -> bool:
    return box.net("curl", "-sf", "-o", "/dev/null", "--max-time", "2",
                   f"http://127.0.0.1:{port}/health", check=False).returncode == 0


@pytest.fixture(scope="module")
def instances(box: Sandbox) -> tuple[int, int]:
    """Two instances of the sample app, A served by a socat forwarder, and no controller."""
    serving_app(box, "post_switch_watch = 0\n[app]\nworkers = 3\n[health]\ninterval = 0.2\n")
    first = int(wait_serving(box)["ActivePort"])
    box.run("systemctl", "stop", "bluegreen.service")
    second = first + 1 if first < 8999 else first - 1
    shell(box, f"sed 's/^BLUEGREEN_PORT=.*/BLUEGREEN_PORT={second}/' "
               f"/run/bluegreen/instances/{first}.env > /run/bluegreen/instances/{second}.env")
    box.run("systemctl", "start", f"bluegreen-app@{second}.service")
    deadline = time.monotonic() + 30
    while not (answers(box, first) and answers(box, second)):
        assert time.monotonic() < deadline, box.journal("-u", f"bluegreen-app@{second}.service")
        time.sleep(0.1)
    for port in (first, second):
        assert box.run("systemctl", "is-active", f"bluegreen-app@{port}.service").stdout.strip() == "active"
    assert box.run("systemctl", "is-active", f"bluegreen-forward@{first}.service").stdout.strip() == "active"
    return first, second


class Wrk:
    """wrk against the public port, from inside the container's network namespace, while the
    block runs; ``report`` holds its counters afterwards."""

    def __init__(self, box: Sandbox, script: Path) -> None:
        self.box = box
        self.script = script
        self.report: dict[str, Any] = {}

    def __enter__(self) -> Wrk:
        self.started = time.time()
        self.process = self.box.popen_net(
            ["wrk", *WRK, "-d", "3600s", "-H", "Connection: close", "-s", str(self.script),
             f"http://127.0.0.1:{PUBLIC_PORT}/"])
        time.sleep(1.0)
        assert self.process.poll() is None, "wrk died at start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.5)
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=60)
        self.output = out
        self.report = json.loads(out.strip().splitlines()[-1])
        self.report["seconds"] = self.report["duration_us"] / 1e6
        self.report["per_second"] = self.report["requests"] / self.report["seconds"]
        self.report["failed"] = sum(self.report[k] for k in ("connect", "read", "write", "status", "timeout"))


def switch(box: Sandbox, kind: str, old: int, new: int, count: int) -> list[dict[str, Any]]:
    result = box.run("/usr/bin/python3", "-c", SWITCHER, kind, str(old), str(new), str(count),
                     str(PUBLIC_PORT), timeout=60 + 10 * count)
    return [json.loads(line) for line in result.stdout.splitlines()]


def unit(kind: str, port: int) -> str:
    return f"bluegreen-{'forward' if kind == 'socat' else 'proxy'}@{port}.service"


def serve_with(box: Sandbox, kind: str, port: int) -> None:
    """Make a ``kind`` forwarder to ``port`` the only one on the public port."""
    wanted = unit(kind, port)
    box.run("systemctl", "start", wanted)
    time.sleep(0.5)
    running = box.run("systemctl", "list-units", "--state=active", "--plain", "--no-legend",
                      "bluegreen-forward@*", "bluegreen-proxy@*").stdout.split()
    for name in running:
        if name.endswith(".service") and name != wanted:
            box.run("systemctl", "stop", name)


def stress(box: Sandbox, kind: str, ports: tuple[int, int], switches: int,
           script: Path) -> dict[str, Any]:
    """``switches`` switches of ``kind`` forwarders between the two ports under wrk's load."""
    old, new = ports
    serve_with(box, kind, old)
    script.write_text(WRK_REPORT)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    with Wrk(box, script) as load:
        records = switch(box, kind, old, new, switches)
    report = load.report
    report["switches"] = records
    report["loadavg_before"] = loadavg
    report["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    stops = sorted(r["stopped"] - r["listening"] for r in records)
    report["stop_seconds"] = {"median": stops[len(stops) // 2], "max": stops[-1]} if stops else {}
    report["switching_seconds"] = records[-1]["stopped"] - records[0]["begin"] if records else 0.0
    return report


def summary(kind: str, report: dict[str, Any]) -> str:
    return (f"\n{kind}: {len(report['switches'])} switches in {report['switching_seconds']:.0f} s under "
            f"{report['requests']} requests, one connection each ({report['per_second']:.0f}/s); "
            f"failed {report['failed']} (connect {report['connect']}, read {report['read']}, "
            f"write {report['write']}, non-2xx {report['status']}, timeout {report['timeout']}); "
            f"old forwarder stopped in {report['stop_seconds'].get('median', 0):.2f} s median, "
            f"{report['stop_seconds'].get('max', 0):.2f} s max; load average "
            f"{' '.join(report['loadavg_before'])} -> {' '.join(report['loadavg_after'])}")


@pytest.fixture
def wrk_script(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "report.lua"


@pytest.mark.parametrize("kind", ["socat", "proxy"])
def test_switches_under_connection_per_request_load_lose_nothing(
        box: Sandbox, instances: tuple[int, int], wrk_script: Path, kind: str) -> None:
    report = stress(box, kind, instances, SWITCHES, wrk_script)
    print(summary(kind, report))
    records = report["switches"]
    assert len(records) == SWITCHES
    assert report["failed"] == 0, report
    assert report["per_second"] >= MIN_CONNECTIONS_PER_SECOND, (
        f"{report['per_second']:.0f} connections/s: too few to stress the switch (busy machine?)")
    # Every old forwarder ended as a stop, not as a failure, and systemd did not restart it.
    for record in records:
        assert record["ActiveState"] == "inactive", record
        assert record["Result"] == "success", record
        assert record["NRestarts"] == "0", record
