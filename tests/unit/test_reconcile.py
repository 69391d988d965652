"""Reconciliation's choice of what serves, from what systemd runs and a switch-back's record."""

from __future__ import annotations

from pathlib import Path

from bluegreen import reconcile, switchback
from bluegreen.serving import Serving

OLD, NEW = "a" * 40, "b" * 40


def instance(release: str, deployment_id: int) -> dict[str, str]:
    return {"BLUEGREEN_RELEASE": release, "BLUEGREEN_DEPLOYMENT_ID": str(deployment_id)}


RUNNING = {8001: instance(OLD, 1), 8002: instance(NEW, 2)}


def test_the_newest_deployment_a_forwarder_reaches_serves() -> None:
    assert reconcile.choose({8001: True, 8002: True}, RUNNING) == Serving(8002, NEW)
    assert reconcile.choose({8001: True}, RUNNING) == Serving(8001, OLD)
    assert reconcile.choose({8001: True, 8002: False}, RUNNING) == Serving(8001, OLD)
    assert reconcile.choose({8003: True}, RUNNING) is None  # its instance does not run


def test_a_switch_back_cut_short_keeps_the_release_it_went_back_to() -> None:
    """Killed while the new forwarder drained: both forwarders run, and the deployment being
    switched back from is the newer."""
    assert reconcile.choose({8001: True, 8002: True}, RUNNING, retiring=2) == Serving(8001, OLD)


def test_a_switch_back_cut_short_before_the_old_forwarder_ran_keeps_the_new_release() -> None:
    """Nothing reaches the old instance: the new release, unhealthy, beats no release at all."""
    assert reconcile.choose({8002: True}, RUNNING, retiring=2) == Serving(8002, NEW)


def test_the_record_of_a_switch_back_is_per_app_and_read_back(tmp_path: Path) -> None:
    assert switchback.retiring(tmp_path, "default") == 0
    switchback.record(tmp_path, "default", 2)
    switchback.record(tmp_path, "staging", 7)
    assert switchback.retiring(tmp_path, "default") == 2
    assert switchback.retiring(tmp_path, "staging") == 7
    switchback.clear(tmp_path, "default")
    assert switchback.retiring(tmp_path, "default") == 0
    assert switchback.retiring(tmp_path, "staging") == 7
