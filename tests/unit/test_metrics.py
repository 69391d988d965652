from __future__ import annotations

from bluegreen.answers import BUCKETS, Answers
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


def test_each_instances_answers_carry_its_release_and_port() -> None:
    old = Answers({"1xx": 0, "2xx": 90, "3xx": 0, "4xx": 2, "5xx": 1}, [93] * len(BUCKETS), 93, 1.5)
    new = Answers({"1xx": 0, "2xx": 7, "3xx": 0, "4xx": 0, "5xx": 3}, [10] * len(BUCKETS), 10, 0.25)
    text = Metrics().render("a" * 40, 8123, True, [("b" * 40, 8200, new), ("a" * 40, 8123, old)])
    lines = text.splitlines()
    assert f'bluegreen_app_responses_total{{release="{"a" * 40}",port="8123",class="2xx"}} 90' in lines
    assert f'bluegreen_app_responses_total{{release="{"b" * 40}",port="8200",class="5xx"}} 3' in lines
    assert (f'bluegreen_app_response_duration_seconds_bucket{{release="{"b" * 40}",port="8200",'
            'le="+Inf"} 10') in lines
    assert f'bluegreen_app_response_duration_seconds_sum{{release="{"a" * 40}",port="8123"}} 1.5' in lines
    # The old instance first (by port), each family declared once.
    responses = [line for line in lines if line.startswith("bluegreen_app_responses_total{")]
    assert 'port="8123"' in responses[0] and 'port="8200"' in responses[-1]
    assert text.count("# TYPE bluegreen_app_responses_total counter") == 1
