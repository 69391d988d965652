"""Canary deployments under load, on a real systemd: the new release takes about the share
asked of new connections, a good one is promoted with no failed request, and one whose pages
fail is aborted by its own answers while the old release keeps serving, the only failed
requests being its own 500s. Then the same with forwarder = "direct"."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    REPO,
    App,
    Load,
    call,
    configure,
    deployment,
    forwarder_unit,
    http,
    kill_controller,
    properties,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import ROOT, Sandbox

pytestmark = pytest.mark.integration

CANARY = {"share": 0.25, "duration": 6, "min_requests": 50, "max_error_rate": 0.05}

# The sample app, but a release whose pages fail about 30 % of the time; its health check passes.
FAILING = (ROOT / "examples/app/app.py").read_text().replace(
    '''@app.get("/")
def index():
''', '''@app.get("/")
def index():
    import random
    if random.random() < 0.3:
        return jsonify(version=VERSION, error="this release fails"), 500
''')


def start(box: Sandbox, forwarder: str = "socat") -> App:
    application = App(box)
    if not box.exists(REPO):
        application.create()
    configure(box, settings(1, workers=4, forwarder=forwarder, canary=CANARY))
    box.run("systemctl", "restart", "bluegreen.service", "bluegreen-api.socket")
    wait_serving(box)
    return application


@pytest.fixture(scope="module")
def sample(box: Sandbox) -> App:
    return start(box)


class Watcher(threading.Thread):
    """Reads the Canary property while a deployment runs: what `bluegreenctl status` shows."""

    def __init__(self, box: Sandbox) -> None:
        super().__init__(daemon=True)
        self.box = box
        self.seen: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            live = properties(self.box).get("Canary") or {}
            if live:
                self.seen.append(live)


def deploy_under_load(box: Sandbox, raw: Path, share: str = "") -> tuple[
        dict[str, Any], dict[str, Any], list[list[Any]], Watcher]:
    """Deploy the branch's head (with ``share``: POST /deploy's canary, else canary.share)
    under load; the record, the load's report, every request (start, end, outcome, version)
    and the live readings of the canary."""
    watcher = Watcher(box)
    with Load(box, "--fast", "4", "--slow", "1", "--raw", str(raw)) as load:
        watcher.start()
        if share:
            answer = http(box, "POST", "/deploy", json.dumps({"canary": share}), unix=True)
            assert answer.status == 202, answer
            deployment_id = answer.body["id"]
        else:
            deployment_id = call(box, "Deploy", "s", "")
        record = wait_deployment(box, deployment_id, timeout=180)
        watcher.stop.set()
        watcher.join()
    return record, load.report, json.loads(raw.read_text()), watcher


def step(record: dict[str, Any], name: str) -> tuple[float, float]:
    for step_name, started, finished in record["steps"]:
        if step_name == name:
            return float(started), float(finished)
    raise AssertionError(f"deployment {record['id']} has no step {name}: {record['steps']}")


def share_during(requests: list[list[Any]], new: str, old: str,
                 until: float | None = None) -> tuple[float, int]:
    """The new release's share of the answers (any status) to requests made while it took its
    canary's share: from its first answer to its last one, or to ``until`` (the canary's end,
    after which it takes every connection); and how many answers that is."""
    first = min(begin for begin, _end, _outcome, version in requests if version == new)
    last = until or max(end for _begin, end, _outcome, version in requests if version == new)
    seen = [version for begin, end, _outcome, version in requests
            if first <= begin and end <= last and version in (new, old)]
    return (seen.count(new) / len(seen) if seen else 0.0), len(seen)


def test_a_good_release_is_promoted_after_its_canary_with_no_failed_request(
        box: Sandbox, sample: App, tmp_path: Path) -> None:
    sample.commit("A good release")
    old, new = str(public(box)["version"]), str(sample.version)
    record, report, requests, watcher = deploy_under_load(box, tmp_path / "requests.json")
    assert record["state"] == "succeeded", record
    assert "canary promoted" in record["reason"], record["reason"]
    window = step(record, "canary")
    share, answers = share_during(requests, new, old, until=window[1])
    print(f"\ncanary of a good release (asked 25 %): {share:.1%} of {answers} answers in its "
          f"{window[1] - window[0]:.1f} s; {report['requests']} requests, {report['failed']} "
          f"failed; {record['reason']}")
    assert report["failed"] == 0, report["failures"]
    assert all(slow["outcome"] == "ok" for slow in report["slow"]), report["slow"]
    assert answers >= 100 and 0.15 <= share <= 0.35, (share, answers)
    assert str(public(box)["version"]) == new
    assert watcher.seen and max(live["canary_requests"] for live in watcher.seen) > 0, watcher.seen
    assert all(live["share"] == 0.25 for live in watcher.seen)


def test_a_release_whose_pages_fail_is_aborted_by_its_canary(
        box: Sandbox, sample: App, tmp_path: Path) -> None:
    before = public(box)
    sample.commit("A release whose pages fail", {"VERSION": "bad\n", "app.py": FAILING})
    record, report, requests, _ = deploy_under_load(box, tmp_path / "requests.json", "30%")
    assert record["state"] == "failed" and record["failed_step"] == "canary", record
    assert "canary aborted" in record["reason"] and "5xx" in record["reason"], record["reason"]
    # The only failed requests are the bad release's own 500s.
    assert report["failed"] > 0, report
    assert report["failures_by_kind"] == {"http-500": report["failed"]}, report["failures_by_kind"]
    assert report["failed_versions"] == {"bad": report["failed"]}, report["failed_versions"]
    assert all(slow["outcome"] == "ok" for slow in report["slow"]), report["slow"]
    window = step(record, "canary")
    share, answers = share_during(requests, "bad", str(before["version"]))
    first_500 = min(begin for begin, _end, outcome, _v in requests if outcome == "http-500")
    last_bad = max(end for _begin, end, _outcome, version in requests if version == "bad")
    print(f"\ncanary of a failing release (asked 30 %): {share:.1%} of {answers} answers; "
          f"{report['failed']} failed of {report['requests']}, all its 500s; aborted "
          f"{window[1] - first_500:.2f} s after its first 500 (last answer from it "
          f"{last_bad - first_500:.2f} s after); {record['reason']}")
    assert answers >= 50 and 0.15 <= share <= 0.45, (share, answers)
    after = public(box)
    assert after["version"] == before["version"] and after["release"] == before["release"]
    instances = call(box, "ListInstances")
    assert {release for _port, state, release in instances if state == "active"} == {before["release"]}
    sample.revert_to(before["release"], "Back to the good release")


def test_promote_ends_a_canary_early_and_a_rollback_aborts_one(box: Sandbox, sample: App) -> None:
    configure(box, settings(1, workers=4, canary={**CANARY, "duration": 120}))
    box.run("systemctl", "reload", "bluegreen.service")
    old = public(box)
    sample.commit("A release promoted by hand")
    deployment_id = call(box, "Deploy", "s", "")
    _wait_for_canary(box)
    assert "Canary:" in box.run("bluegreenctl", "status").stdout
    promoted_by = box.run("bluegreenctl", "promote").stdout
    assert f"Deployment {deployment_id}: canary promoted" in promoted_by, promoted_by
    record = wait_deployment(box, deployment_id)
    assert record["state"] == "succeeded" and "promoted by the operator" in record["reason"], record
    assert step(record, "canary")[1] - step(record, "canary")[0] < 30

    promoted = public(box)
    assert promoted["version"] != old["version"]
    sample.commit("A release rolled back by hand")
    deployment_id = call(box, "Deploy", "s", "")
    _wait_for_canary(box)
    # It follows the canary's own deployment, which ends failed at step canary: exit 1.
    aborted = box.run("bluegreenctl", "rollback", check=False)
    assert aborted.returncode == 1 and "canary" in aborted.stdout + aborted.stderr, aborted
    record = wait_deployment(box, deployment_id)
    assert record["state"] == "failed" and record["failed_step"] == "canary", record
    assert "aborted by the operator" in record["reason"], record["reason"]
    assert public(box)["release"] == promoted["release"]
    nothing = box.run("bluegreenctl", "promote", check=False)
    assert nothing.returncode == 1 and "no canary" in nothing.stderr, nothing


def test_a_controller_that_dies_during_a_canary_keeps_the_old_release(
        box: Sandbox, sample: App, tmp_path: Path) -> None:
    """Killed with the traffic split, the controller is restarted by systemd and finds two
    releases reached from the public port: the old one stays (the canary's switch-back record),
    the canary's instances stop, and no request fails meanwhile."""
    configure(box, settings(1, workers=4, canary={**CANARY, "duration": 120}))
    box.run("systemctl", "reload", "bluegreen.service")
    old = public(box)
    sample.commit("A release whose controller dies during its canary")
    with Load(box, "--fast", "4", "--slow", "1") as load:
        deployment_id = call(box, "Deploy", "s", "")
        _wait_for_canary(box)
        time.sleep(1.0)
        kill_controller(box)
        wait_serving(box)
        record = deployment(box, deployment_id)
        time.sleep(1.0)
    assert record["state"] == "interrupted", record
    assert report_ok(load.report)
    assert public(box)["release"] == old["release"]
    active = {release for _port, state, release in call(box, "ListInstances") if state == "active"}
    assert active == {old["release"]}, active
    assert not properties(box).get("Canary")
    sample.revert_to(old["release"], "Back to the release that serves")


def report_ok(report: dict[str, Any]) -> bool:
    assert report["failed"] == 0, report["failures"]
    assert all(slow["outcome"] == "ok" for slow in report["slow"]), report["slow"]
    return True


def _wait_for_canary(box: Sandbox, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not properties(box).get("Canary"):
        assert time.monotonic() < deadline, "no canary began"
        time.sleep(0.2)


def change_forwarder(box: Sandbox, forwarder: str) -> App:
    """bluegreen on another kind of forwarder: one user's sockets alone share a port, so
    bluegreen, its forwarders and instances stop first; the start-up deploy serves again."""
    box.run("systemctl", "stop", "bluegreen.service")
    box.run("systemctl", "stop", "bluegreen-forward@*.service", "bluegreen-proxy@*.service",
            "bluegreen-haproxy.service", "bluegreen-app@*.service", "bluegreen-app@*.socket",
            "bluegreen-app-public@*.socket")
    return start(box, forwarder=forwarder)


@pytest.mark.parametrize("forwarder", ["direct", "haproxy", "proxy"])
def test_a_canary_with_another_forwarder(box: Sandbox, sample: App, tmp_path: Path,
                                         forwarder: str) -> None:
    """direct: the instances hold the public port themselves, and the steering program's
    weights split its new connections, as with the built-in proxy's listeners; haproxy: its
    two servers' weights split requests."""
    change_forwarder(box, forwarder)
    port = wait_serving(box)["ActivePort"]  # really served by that kind of forwarder now
    assert box.run("systemctl", "is-active", forwarder_unit(box, port)).stdout.strip() == "active"
    sample.commit(f"A good release behind {forwarder}")
    old, new = str(public(box)["version"]), str(sample.version)
    record, report, requests, _ = deploy_under_load(box, tmp_path / "requests.json")
    assert record["state"] == "succeeded", record
    share, answers = share_during(requests, new, old, until=step(record, "canary")[1])
    print(f"\ncanary with forwarder = \"{forwarder}\" (asked 25 %): {share:.1%} of {answers} "
          f"answers; {report['requests']} requests, {report['failed']} failed")
    assert report["failed"] == 0, report["failures"]
    assert answers >= 100 and 0.15 <= share <= 0.35, (share, answers)
    assert str(public(box)["version"]) == new
