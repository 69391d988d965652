"""The record of the deployment in progress, and its one writer.

The deploy flow marks each step with ``async with recorder.step(Step.X, port):``; the recorder
saves the record, logs the step and tells the controller's observers (the D-Bus signals, the
daemon's status line). Which step is under way is the recorder's to know, so a failure names
the step it happened in without the flow keeping count.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bluegreen import health, instances
from bluegreen.config import Config, share_text
from bluegreen.forwarders import control
from bluegreen.history import (
    Deployment,
    History,
    HistoryError,
    State,
    Step,
    StepTiming,
    Trigger,
    finished,
    with_step,
)
from bluegreen.log import MessageId, fields
from bluegreen.release.repository import Commit
from bluegreen.serving import Serving

if TYPE_CHECKING:  # deploy.py marks its steps here
    from bluegreen.deploy import DeployFailed

log = logging.getLogger(__name__)

# Told of every step as it starts: the record, the step and the port it works on.
StepObserver = Callable[[Deployment, Step, int], None]

_STEP_TEXT = {
    Step.MATERIALIZE: "materializing release {commit}",
    Step.VERIFY: "verifying release {commit}",
    Step.MIGRATE: "running the release phase of {commit}",
    Step.START: "starting {instance}",
    Step.HEALTH: "checking {health} on port {port}",
    Step.CANARY: "canary: port {public} gives {share} of new connections to port {port}",
    Step.SWITCH: "switching port {public} to port {port}",
    Step.DRAIN: "draining the old forwarder and instance on port {port}",
    Step.WATCH: "watching the new release on port {port}",
    Step.SWITCH_BACK: "switching port {public} back to the old instance on port {port}",
    Step.WORKERS: "starting the workers of {commit}, stopping the old ones",
    Step.STOP_OLD: "stopping the old instance {instance}",
}
_FORWARDER_STEPS = (Step.CANARY, Step.SWITCH, Step.DRAIN, Step.SWITCH_BACK)


def save(history: History, record: Deployment) -> None:
    """Save a record; if the disk refuses, say so and go on (what serves is unaffected)."""
    try:
        history.save(record)
    except HistoryError as exc:
        log.error("%s; deployment %d goes on unrecorded", exc, record.id,
                  extra=fields(deployment_id=record.id))


def begin(history: History, ref: str, trigger: Trigger, commit: Commit, serving: Serving | None,
          started: float, config: Config, observe: StepObserver) -> Recorder:
    """Record a new deployment of ``commit`` (resolved from ``ref`` since ``started``) that
    replaces ``serving``, to be deployed with ``config``."""
    deployment = history.begin(
        ref, trigger, commit=commit.sha, subject=commit.subject, author=commit.author,
        previous_port=serving.port if serving else 0,
        previous_release=serving.release if serving else "", now=started)
    deployment = replace(deployment, steps=(StepTiming(str(Step.RESOLVE), started, time.time()),))
    save(history, deployment)
    log.info("deployment %d started: %s %s (%s) by %s", deployment.id, commit.short,
             commit.subject, deployment.ref, trigger,
             extra=fields(message_id=MessageId.DEPLOY_STARTED, deployment_id=deployment.id,
                          release=commit.sha, trigger=trigger))
    return Recorder(deployment, history, config, observe)


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
        # The canary's share asked for this deployment; None: canary.share of its settings.
        self.canary_share: float | None = None

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

    def note(self, text: str) -> None:
        """Add ``text`` to what the record of a deployment that succeeds says."""
        self.update(reason="; ".join(part for part in (self.record.reason, text) if part))

    def failed(self, exc: DeployFailed) -> None:
        record = self.record
        log.error("deployment %d %s at %s: %s", record.id,
                  "switched back" if exc.state == State.SWITCHED_BACK else "failed", exc.step,
                  exc.reason,
                  extra=fields(message_id=MessageId.DEPLOY_FAILED, deployment_id=record.id,
                               release=record.commit, port=record.port or None, step=exc.step))

    def finish(self, state: State, *, failed_step: str = "", reason: str = "",
               serving: Serving | None = None) -> Deployment:
        """The deployment's outcome (``serving``: what serves after one that succeeded)."""
        record = self.record = finished(self.record, state, failed_step=failed_step, reason=reason)
        save(self.history, record)
        if serving is not None and state == State.SUCCEEDED:
            log.info("deployment %d succeeded: %s serves on %s (%.2f s)", record.id,
                     record.commit[:12], serving.describe(), record.duration or 0,
                     extra=fields(message_id=MessageId.DEPLOY_SUCCEEDED, deployment_id=record.id,
                                  release=record.commit, port=record.port))
        return record

    def _begin(self, step: Step, port: int) -> None:
        record = self.record = with_step(self.record, step)
        save(self.history, record)
        config = self.config
        what = _STEP_TEXT.get(step, str(step)).format(
            commit=record.commit[:12], instance=instances.unit(port), port=port,
            health=config.app.health_path or health.HEALTH_PATH, public=config.ports.public,
            share=share_text(self.canary_share or 0))
        unit = control.unit(port, config.forwarder) if step in _FORWARDER_STEPS \
            else instances.unit(port)
        log.info("deployment %d: %s", record.id, what,
                 extra=fields(deployment_id=record.id, release=record.commit, step=step,
                              port=port or None, unit=unit if port else None))
        self.observe(record, step, port)
