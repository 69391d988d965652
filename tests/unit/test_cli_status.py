"""bluegreenctl status reads the deployments finished since the start from the D-Bus API's
DeploymentsFinished property."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import pytest

from bluegreen import client
from bluegreen.api import dbus
from bluegreen.canary import Reading, Side
from bluegreen.cli import status
from bluegreen.history import Deployment, State, Trigger
from bluegreen.metrics import Metrics


class Controller:
    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.metrics = Metrics()
        self.reading: Reading | None = None  # the canary under way

    def canary(self) -> Reading | None:
        return self.reading


def finished(state: State) -> Deployment:
    return Deployment(id=1, ref="main", trigger=Trigger.CLI, state=state, started_at=1.0,
                      finished_at=2.0, commit="a" * 40)


class Client:
    """Answers as the daemon does, its DeploymentsFinished from the D-Bus interface itself."""

    def __init__(self, interface: dbus.ManagerInterface, maintenance: str = "") -> None:
        self.interface = interface
        self.maintenance = maintenance

    async def status(self) -> dict[str, Any]:
        return {"ActiveRelease": "a" * 40, "ActivePort": 8001, "PublicPort": 5000,
                "Healthy": True, "HealthReason": "fine", "Watching": False, "Branch": "main",
                "State": "serving", "Repository": "", "RemoteError": "", "CurrentDeployment": "",
                "LastDeployment": "", "DeploymentsFinished": self.interface.DeploymentsFinished,
                "Maintenance": bool(self.maintenance), "MaintenanceMessage": self.maintenance,
                "Canary": client.plain(self.interface.Canary)}

    async def pending_settings(self) -> list[Any]:
        return []

    async def instances(self) -> list[Any]:
        return []

    async def workers(self) -> list[Any]:
        return []

    async def domains(self) -> list[dict[str, Any]]:
        return [{"domain": "a.example", "issuer": "Pebble Intermediate CA 1", "expires": 1800000000.0,
                 "reason": ""},
                {"domain": "b.example", "issuer": "", "expires": None, "reason": "not issued yet"}]


def interface(controller: Controller | None = None) -> dbus.ManagerInterface:
    async def reload() -> list[tuple[str, str]]:
        return []

    return dbus.ManagerInterface(controller or Controller(), reload)  # type: ignore[arg-type]


def test_status_shows_each_domain_with_its_certificate_or_why_it_has_none(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncio.run(status.run(Client(interface()), argparse.Namespace(json=False))) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    expiry = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1800000000.0))
    assert f"Domain:      a.example: certificate from Pebble Intermediate CA 1, expires {expiry}" in lines
    assert "Domain:      b.example: no certificate: not issued yet" in lines
    assert asyncio.run(status.run(Client(interface()), argparse.Namespace(json=True))) == 0  # type: ignore[arg-type]
    shown = json.loads(capsys.readouterr().out)
    assert [d["domain"] for d in shown["Domains"]] == ["a.example", "b.example"]


def test_status_says_when_the_front_answers_with_the_maintenance_page(
        capsys: pytest.CaptureFixture[str]) -> None:
    client = Client(interface(), maintenance="Back at noon")
    assert asyncio.run(status.run(client, argparse.Namespace(json=False))) == 0  # type: ignore[arg-type]
    assert 'Maintenance: on: the front answers 503 with "Back at noon"' in capsys.readouterr().out
    assert asyncio.run(status.run(Client(interface()), argparse.Namespace(json=False))) == 0  # type: ignore[arg-type]
    assert "Maintenance" not in capsys.readouterr().out


def test_status_shows_the_deployments_finished_since_the_start(
        capsys: pytest.CaptureFixture[str]) -> None:
    controller = Controller()
    for state in (State.SUCCEEDED, State.FAILED, State.SUCCEEDED):
        controller.metrics.deployment_finished(finished(state))

    async def reload() -> list[tuple[str, str]]:
        return []

    interface = dbus.ManagerInterface(controller, reload)  # type: ignore[arg-type]
    args = argparse.Namespace(json=False)
    assert asyncio.run(status.run(Client(interface), args)) == 0  # type: ignore[arg-type]
    assert "Since start: 1 failed, 2 succeeded" in capsys.readouterr().out.splitlines()


def test_status_says_what_became_of_the_web_lines_steps(capsys: pytest.CaptureFixture[str]) -> None:
    record = Deployment(id=4, ref="main", trigger=Trigger.CLI, state=State.SUCCEEDED,
                        started_at=1.0, finished_at=2.0, commit="b" * 40, subject="Django",
                        web_steps=("python manage.py migrate -> release phase",
                                   "echo hi -> ignored"))

    class Deployed(Client):
        async def status(self) -> dict[str, Any]:
            return {**await super().status(), "LastDeployment": "4"}

        async def deployment(self, deployment_id: str) -> dict[str, Any]:
            assert deployment_id == "4"
            return client.deployment(dbus.deployment_to_variant(record))

    assert asyncio.run(status.run(Deployed(interface()), argparse.Namespace(json=False))) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert "Web line:    python manage.py migrate -> release phase" in lines
    assert "Web line:    echo hi -> ignored" in lines


def test_status_shows_the_canary_under_way_with_both_releases_answers(
        capsys: pytest.CaptureFixture[str]) -> None:
    controller = Controller()
    controller.reading = Reading(0.25, Side(412, 3), Side(1250, 2), 12.2, 60.0)
    assert asyncio.run(status.run(Client(interface(controller)), argparse.Namespace(json=False))) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("Canary:      25% of new connections asked, 24.8% of the answers measured; "
                        "12 s of 60 s")
    assert lines[start + 1:start + 3] == ["             new release: 412 answers, 3 5xx (0.7%)",
                                          "             old release: 1250 answers, 2 5xx (0.2%)"]
    assert asyncio.run(status.run(Client(interface(controller)), argparse.Namespace(json=True))) == 0  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out)["Canary"] == {
        "share": 0.25, "measured_share": 412 / 1662, "canary_requests": 412, "canary_errors": 3,
        "stable_requests": 1250, "stable_errors": 2, "elapsed": 12.2, "duration": 60.0}


def test_status_without_a_canary_shows_none(capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncio.run(status.run(Client(interface()), argparse.Namespace(json=False))) == 0  # type: ignore[arg-type]
    assert "Canary" not in capsys.readouterr().out
    assert asyncio.run(status.run(Client(interface()), argparse.Namespace(json=True))) == 0  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out)["Canary"] == {}
