"""Taking an instance out of the public port: its forwarder drains in the background while the
health monitor goes on checking every instance."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from bluegreen import health
from bluegreen.config import Config
from bluegreen.forwarders import control
from bluegreen.pool import Pool
from bluegreen.serving import Serving
from bluegreen.systemd import SystemdError

SICK, WELL = 8003, 8002


class Checks:
    """Stands in for health.probe: counts the checks of each port; SICK fails them all."""

    def __init__(self) -> None:
        self.count = {SICK: 0, WELL: 0}

    async def probe(self, port: int, *_: object) -> health.Probe:
        self.count[port] += 1
        return health.Probe(port != SICK, "HTTP 500" if port == SICK else "HTTP 200")


def monitored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drain_stop: object) -> tuple[
        Pool, health.Monitor, Checks]:
    base = Config()
    config = replace(base, health=replace(base.health, interval=0.01, unhealthy_threshold=2),
                     app=replace(base.app, instances=2), drain_timeout=30)
    checks = Checks()
    monkeypatch.setattr(health, "probe", checks.probe)
    monkeypatch.setattr(control, "drain_stop", drain_stop)
    forwarders = control.Forwarders(None, tmp_path, "default")  # type: ignore[arg-type]
    pool = Pool(None, forwarders, lambda: config, is_busy=lambda: False)  # type: ignore[arg-type]
    pool.reset(Serving.of([WELL, SICK], "a" * 40))

    async def on_change(healthy: bool, reason: str) -> None:
        pass

    monitor = health.Monitor(health.Check.of(config), lambda: (WELL, SICK), on_change,
                             on_probe=pool.probed)
    return pool, monitor, checks


def test_the_monitor_keeps_checking_while_a_forwarder_drains(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    draining = asyncio.Event()

    async def slow_drain(systemd: object, run_dir: Path, port: int, timeout: float) -> None:
        draining.set()
        await asyncio.sleep(timeout)  # connections in flight that take the whole drain_timeout

    pool, monitor, checks = monitored(tmp_path, monkeypatch, slow_drain)

    async def scenario() -> int:
        running = asyncio.create_task(monitor.run())
        await asyncio.wait_for(draining.wait(), 5)
        before = checks.count[WELL]
        await asyncio.sleep(0.5)
        running.cancel()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # the drain, wherever it runs
        return checks.count[WELL] - before

    checked = asyncio.run(scenario())
    assert pool.out() == [SICK]
    assert checked >= 10  # every 0.01 s for 0.5 s, on a busy machine too


def test_a_drain_that_fails_in_the_background_is_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def failing_drain(systemd: object, run_dir: Path, port: int, timeout: float) -> None:
        await asyncio.sleep(0.05)
        raise SystemdError("StopUnit: Connection timed out")

    pool, _monitor, _checks = monitored(tmp_path, monkeypatch, failing_drain)

    async def scenario() -> None:
        await pool.take_out(SICK, "killed")
        assert list(pool.draining) == [SICK]
        await pool.put_back(SICK)  # still stopping: not yet
        assert pool.out() == [SICK]
        await asyncio.wait_for(pool.settled(), 5)
        assert pool.draining == {}

    with caplog.at_level(logging.ERROR, logger="bluegreen.pool"):
        asyncio.run(scenario())
    assert "the forwarder to port 8003 is not stopped: StopUnit: Connection timed out" in caplog.text
