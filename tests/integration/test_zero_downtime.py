"""No request is lost during a deploy: load and slow requests through consecutive deploys, four
here, ten in test_zero_downtime_stress.py (scripts/test --stress)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    Load,
    deploy_new_release,
    forwarder_unit,
    public,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

DEPLOYS = 10  # under the stress marker
QUICK_DEPLOYS = 4
SLOW_SECONDS = 3.0


@pytest.fixture(scope="module")
def config_extra() -> str:
    # Four workers: the two slow-request threads must not starve the fast ones.
    return "post_switch_watch = 1\n[app]\nworkers = 4\n[health]\ninterval = 0.2\n"


@pytest.fixture(scope="module")
def deploys() -> int:
    """Deploys in the test: four in the default suite, ten under the stress marker (each
    forwarder's *_stress module)."""
    return QUICK_DEPLOYS


def step_time(record: dict[str, Any], name: str) -> float:
    for step, started, _finished in record["steps"]:
        if step == name:
            return float(started)
    raise AssertionError(f"deployment {record['id']} has no step {name}: {record['steps']}")


def test_deploys_under_load_fail_no_request(box: Sandbox, app: App, deploys: int) -> None:
    box.run("systemctl", "start", "bluegreen.service")
    port = wait_serving(box)["ActivePort"]
    assert box.run("systemctl", "is-active", forwarder_unit(box, port)).stdout.strip() == "active"
    records = []
    with Load(box, "--fast", "4", "--slow", "2", "--slow-seconds", str(SLOW_SECONDS)) as load:
        for number in range(deploys):
            records.append(deploy_new_release(box, app, f"Release {number + 2}"))
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
