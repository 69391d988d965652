"""The record of the deployment in progress, and its one writer.

The deploy flow marks each step with ``async with recorder.step(Step.X, port):``; the recorder
saves the record, logs the step and tells the controller's observers (the D-Bus signals, the
daemon's status line). Which step is under way is the recorder's to know, so a failure names
the step it happened in without the flow keeping count.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from bluegreen import instances
from bluegreen.config import Config
from bluegreen.forwarders import control
from bluegreen.history import Deployment, History, HistoryError, State, Step, finished, with_step
from bluegreen.log import fields

log = logging.getLogger(__name__)

# Told of every step as it starts: the record, the step and the port it works on.
StepObserver = Callable[[Deployment, Step, int], None]

_STEP_TEXT = {
    Step.MATERIALIZE: "materializing release {commit}",
    Step.VERIFY: "verifying release {commit}",
    Step.MIGRATE: "running the release phase of {commit}",
    Step.START: "starting {instance}",
    Step.HEALTH: "checking {health} on port {port}",
    Step.SWITCH: "switching port {public} to port {port}",
    Step.DRAIN: "draining the old forwarder and instance on port {port}",
    Step.WATCH: "watching the new release on port {port}",
    Step.SWITCH_BACK: "switching port {public} back to the old instance on port {port}",
    Step.WORKERS: "starting the workers of {commit}, stopping the old ones",
    Step.STOP_OLD: "stopping the old instance {instance}",
}
_FORWARDER_STEPS = (Step.SWITCH, Step.DRAIN, Step.SWITCH_BACK)


def save(history: History, record: Deployment) -> None:
    """Save a record; if the disk refuses, say so and go on (what serves is unaffected)."""
    try:
        history.save(record)
    except HistoryError as exc:
        log.error("%s; deployment %d goes on unrecorded", exc, record.id,
                  extra=fields(deployment_id=record.id))


class Recorder:
    """The record of one deployment, deployed with ``config``."""

    def __init__(self, record: Deployment, history: History, config: Config,
                 observe: StepObserver = lambda record, step, port: None) -> None:
        self.record = record
        self.history = history
        self.config = config
        self.observe = observe
        self.current = Step.RESOLVE
        self._unreported: Step | None = None

    @contextlib.asynccontextmanager
    async def step(self, step: Step, port: int | None = 0) -> AsyncIterator[None]:
        """Mark ``step`` as under way for the block. ``port`` None: the step's port is not
        known yet; the step is reported when ``at_port`` names it."""
        self.current = step
        if port is None:
            self._unreported = step
        else:
            self._begin(step, port)
        yield

    def at_port(self, port: int) -> None:
        """The deployment's new release runs on ``port``."""
        self.update(port=port)
        if self._unreported is not None:
            step, self._unreported = self._unreported, None
            self._begin(step, port)

    def update(self, **changes: Any) -> None:
        self.record = replace(self.record, **changes)

    def finish(self, state: State, *, failed_step: str = "", reason: str = "") -> Deployment:
        self.record = finished(self.record, state, failed_step=failed_step, reason=reason)
        save(self.history, self.record)
        return self.record

    def _begin(self, step: Step, port: int) -> None:
        record = self.record = with_step(self.record, step)
        save(self.history, record)
        config = self.config
        what = _STEP_TEXT.get(step, str(step)).format(
            commit=record.commit[:12], instance=instances.unit(port), port=port,
            health=config.app.health_path, public=config.ports.public)
        unit = control.unit(port, config.forwarder) if step in _FORWARDER_STEPS \
            else instances.unit(port)
        log.info("deployment %d: %s", record.id, what,
                 extra=fields(deployment_id=record.id, release=record.commit, step=step,
                              port=port or None, unit=unit if port else None))
        self.observe(record, step, port)
