"""Counters of the controller, exposed in the Prometheus text format (GET /metrics).

Counters start at zero when the controller starts (Prometheus takes resets in its stride);
the serving release and the last successful deployment come from the controller's state.
The answers of each running instance, by status class and duration, are counted inside it
(answers.py) and carry its release and port as labels: old and new release side by side.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bluegreen.answers import BUCKETS, CLASSES, Answers
from bluegreen.history import Deployment, State, Trigger

DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def _labels(**values: str) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in values.items())
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class Metrics:
    deployments: Counter[tuple[str, str]] = field(default_factory=Counter)
    duration_buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    duration_count: int = 0
    step_sum: dict[str, float] = field(default_factory=dict)
    step_count: Counter[str] = field(default_factory=Counter)
    health_check_failures: int = 0
    rollbacks: Counter[str] = field(default_factory=Counter)
    last_success: float = 0.0

    def deployment_finished(self, record: Deployment) -> None:
        self.deployments[(record.state, record.trigger)] += 1
        if record.duration is not None:
            self.duration_sum += record.duration
            self.duration_count += 1
            for index, bound in enumerate(DURATION_BUCKETS):
                if record.duration <= bound:
                    self.duration_buckets[index] += 1
        for step in record.steps:
            if step.finished is not None:
                self.step_sum[step.step] = self.step_sum.get(step.step, 0.0) + step.finished - step.started
                self.step_count[step.step] += 1
        if record.state == State.SWITCHED_BACK:
            self.rollbacks["automatic"] += 1
        if record.trigger == Trigger.ROLLBACK and record.state == State.SUCCEEDED:
            self.rollbacks["manual"] += 1
        if record.state == State.SUCCEEDED and record.finished_at:
            self.last_success = max(self.last_success, record.finished_at)

    def by_result(self) -> dict[str, int]:
        """Deployments finished since the start, by result, whatever their trigger."""
        totals: dict[str, int] = {}
        for (state, _trigger), count in self.deployments.items():
            totals[state] = totals.get(state, 0) + count
        return totals

    def render(self, serving_release: str, serving_port: int, healthy: bool,
               answered: list[tuple[str, int, Answers]] | None = None) -> str:
        """The text; ``answered``: each running instance's release, port and answers."""
        lines: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        family("bluegreen_deployments_total", "counter", "Deployments finished, by result and trigger.")
        for (state, trigger), count in sorted(self.deployments.items()):
            lines.append(f"bluegreen_deployments_total{_labels(result=state, trigger=trigger)} {count}")

        family("bluegreen_deploy_duration_seconds", "histogram", "Time from request to finish.")
        for bound, count in zip(DURATION_BUCKETS, self.duration_buckets, strict=True):
            lines.append(f"bluegreen_deploy_duration_seconds_bucket{_labels(le=_number(bound))} {count}")
        lines.append(f'bluegreen_deploy_duration_seconds_bucket{{le="+Inf"}} {self.duration_count}')
        lines.append(f"bluegreen_deploy_duration_seconds_sum {_number(self.duration_sum)}")
        lines.append(f"bluegreen_deploy_duration_seconds_count {self.duration_count}")

        family("bluegreen_deploy_step_duration_seconds", "summary", "Time spent in each step.")
        for step in sorted(self.step_count):
            lines.append(f"bluegreen_deploy_step_duration_seconds_sum{_labels(step=step)} "
                         f"{_number(self.step_sum[step])}")
            lines.append(f"bluegreen_deploy_step_duration_seconds_count{_labels(step=step)} "
                         f"{self.step_count[step]}")

        family("bluegreen_health_check_failures_total", "counter",
               "Failed health checks of the serving release.")
        lines.append(f"bluegreen_health_check_failures_total {self.health_check_failures}")

        family("bluegreen_rollbacks_total", "counter",
               "Rollbacks: asked for (manual) or after a failed watch (automatic).")
        for kind in ("automatic", "manual"):
            lines.append(f"bluegreen_rollbacks_total{_labels(kind=kind)} {self.rollbacks[kind]}")

        family("bluegreen_last_successful_deploy_timestamp_seconds", "gauge",
               "When the last successful deployment finished (Unix time; 0: none since start).")
        lines.append(f"bluegreen_last_successful_deploy_timestamp_seconds {_number(self.last_success)}")

        family("bluegreen_release_info", "gauge", "The release that serves, and its instance port.")
        if serving_release:
            labels = _labels(release=serving_release, port=str(serving_port))
            lines.append(f"bluegreen_release_info{labels} 1")

        family("bluegreen_healthy", "gauge", "1 when a release serves and passes its health checks.")
        lines.append(f"bluegreen_healthy {1 if healthy else 0}")

        answered = sorted(answered or [], key=lambda item: item[1])
        family("bluegreen_app_responses_total", "counter",
               "Answers of each running instance by status class (a failed request is a 5xx).")
        for release, port, counts in answered:
            for name in CLASSES:
                labels = _labels(release=release, port=str(port), **{"class": name})
                lines.append(f"bluegreen_app_responses_total{labels} {counts.classes[name]}")
        family("bluegreen_app_response_duration_seconds", "histogram",
               "How long each running instance took to answer.")
        for release, port, counts in answered:
            for bound, count in zip(BUCKETS, counts.buckets, strict=True):
                labels = _labels(release=release, port=str(port), le=_number(bound))
                lines.append(f"bluegreen_app_response_duration_seconds_bucket{labels} {count}")
            labels = _labels(release=release, port=str(port), le="+Inf")
            lines.append(f"bluegreen_app_response_duration_seconds_bucket{labels} {counts.count}")
            labels = _labels(release=release, port=str(port))
            lines.append(f"bluegreen_app_response_duration_seconds_sum{labels} "
                         f"{_number(round(counts.seconds, 6))}")
            lines.append(f"bluegreen_app_response_duration_seconds_count{labels} {counts.count}")
        return "\n".join(lines) + "\n"
