from __future__ import annotations

from bluegreen.history import Deployment, State, StepTiming, Trigger
from bluegreen.metrics import Metrics


def record(state: State, trigger: Trigger, duration: float) -> Deployment:
    return Deployment(id=1, ref="main", trigger=trigger, state=state, started_at=100.0,
                      finished_at=100.0 + duration, commit="a" * 40,
                      steps=(StepTiming("start", 100.0, 100.5), StepTiming("health", 100.5, 101.0)))


def test_prometheus_text() -> None:
    metrics = Metrics()
    metrics.deployment_finished(record(State.SUCCEEDED, Trigger.REFRESHER, 3.0))
    metrics.deployment_finished(record(State.SWITCHED_BACK, Trigger.CLI, 12.0))
    metrics.deployment_finished(record(State.SUCCEEDED, Trigger.ROLLBACK, 4.0))
    metrics.health_check_failures = 7
    text = metrics.render("a" * 40, 8123, True)
    lines = set(text.splitlines())
    assert 'bluegreen_deployments_total{result="succeeded",trigger="refresher"} 1' in lines
    assert 'bluegreen_deployments_total{result="switched-back",trigger="cli"} 1' in lines
    assert 'bluegreen_deploy_duration_seconds_bucket{le="5"} 2' in lines
    assert 'bluegreen_deploy_duration_seconds_bucket{le="+Inf"} 3' in lines
    assert "bluegreen_deploy_duration_seconds_sum 19" in lines
    assert 'bluegreen_deploy_step_duration_seconds_count{step="health"} 3' in lines
    assert 'bluegreen_rollbacks_total{kind="automatic"} 1' in lines
    assert 'bluegreen_rollbacks_total{kind="manual"} 1' in lines
    assert "bluegreen_health_check_failures_total 7" in lines
    assert f'bluegreen_release_info{{release="{"a" * 40}",port="8123"}} 1' in lines
    assert "bluegreen_last_successful_deploy_timestamp_seconds 104" in lines
    assert "bluegreen_healthy 1" in lines
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert name.startswith("bluegreen_") and float(value) >= 0


def test_deployments_by_result_sum_over_triggers() -> None:
    metrics = Metrics()
    assert metrics.by_result() == {}
    metrics.deployment_finished(record(State.SUCCEEDED, Trigger.REFRESHER, 3.0))
    metrics.deployment_finished(record(State.SUCCEEDED, Trigger.CLI, 3.0))
    metrics.deployment_finished(record(State.FAILED, Trigger.CLI, 3.0))
    assert metrics.by_result() == {"succeeded": 2, "failed": 1}
