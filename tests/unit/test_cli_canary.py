"""bluegreenctl and a canary: deploy --canary SHARE, the canary's progress while a deploy is
followed, and promote."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from dbus_next import Message, MessageType, Variant

from bluegreen import cli
from bluegreen.api import dbus
from bluegreen.api.names import Error
from bluegreen.canary import Reading, Side
from bluegreen.cli import common
from bluegreen.client import ApiError, Client, plain

RECORD = {"id": "7", "commit": "b" * 40, "subject": "New", "trigger": "cli", "ref": "main",
          "state": "succeeded", "duration": 70.0, "port": 8456, "failed_step": None, "reason": ""}


def reading(canary: Side, stable: Side, elapsed: float) -> dict[str, Any]:
    """The Canary property as a client reads it, from the D-Bus interface itself."""

    class Controller:
        observers: list[Any] = []

        def canary(self) -> Reading:
            return Reading(0.25, canary, stable, elapsed, 60.0)

    async def reload() -> list[tuple[str, str]]:
        return []

    interface = dbus.ManagerInterface(Controller(), reload)  # type: ignore[arg-type]
    return dict(plain(interface.Canary))


class StubClient:
    """A daemon whose deploy is followed through a canary: each reading of the Canary property
    is the next of ``readings``; the deployment ends once they are all read."""

    def __init__(self, readings: list[dict[str, Any]] | None = None) -> None:
        self.deployed: list[tuple[str, float | None]] = []
        self.readings = list(readings or [])
        self.promoted = 0
        self.no_canary = False

    async def deploy(self, ref: str = "", trigger: str = "dbus", wait: bool = False,
                     canary: float | None = None) -> str:
        self.deployed.append((ref, canary))
        return "7"

    async def deployment(self, deployment_id: str) -> dict[str, Any]:
        return RECORD

    async def canary(self) -> dict[str, Any]:
        return self.readings.pop(0) if self.readings else {}

    async def promote(self) -> str:
        if self.no_canary:
            raise ApiError.of(Error.NO_CANARY, "no canary is under way: nothing to promote")
        self.promoted += 1
        return "7"

    async def follow(self, start: Callable[[], Awaitable[str]],
                     on_step: Callable[[str, str, int], None]) -> dict[str, Any]:
        await start()
        on_step("health", "b" * 40, 8456)
        on_step("canary", "b" * 40, 8456)
        for _ in range(50):  # half a second at most: JSON output reads none
            if not self.readings:
                break
            await asyncio.sleep(0.01)
        on_step("switch", "b" * 40, 8456)
        return RECORD

    def close(self) -> None:
        pass


@pytest.fixture()
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubClient]:
    """bluegreenctl's connection reaches a StubClient; the canary is read every 10 ms."""
    stub = StubClient()

    async def connect(app: str = "default") -> StubClient:
        return stub

    monkeypatch.setattr(Client, "connect", connect)
    monkeypatch.setattr(common, "CANARY_POLL", 0.01)
    monkeypatch.setattr(common, "CANARY_EVERY", 0.0)
    yield stub


@pytest.mark.parametrize(("given", "share"), [("25%", 0.25), ("0.25", 0.25), ("0", 0.0),
                                              ("12.5%", 0.125)])
def test_deploy_asks_for_the_canary_share_given(daemon: StubClient, given: str,
                                                share: float) -> None:
    assert cli.main(["deploy", "v2", "--canary", given, "--no-wait"]) == 0
    assert daemon.deployed == [("v2", share)]


def test_deploy_without_canary_leaves_it_to_the_configuration(daemon: StubClient) -> None:
    assert cli.main(["deploy", "--no-wait"]) == 0
    assert daemon.deployed == [("", None)]


@pytest.mark.parametrize("given", ["100%", "1", "-5%", "lots", "0.25.1", "nan"])
def test_a_bad_canary_share_is_a_usage_error_before_any_call(
        daemon: StubClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        given: str) -> None:
    async def connect(app: str = "default") -> StubClient:
        raise AssertionError("nothing may be called")

    monkeypatch.setattr(Client, "connect", connect)
    with pytest.raises(SystemExit) as exited:
        cli.main(["deploy", "--canary", given])
    assert exited.value.code == 2
    assert "argument --canary: " in capsys.readouterr().err


def test_following_a_deploy_shows_the_canary_as_its_answers_change(
        daemon: StubClient, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.readings = [
        reading(Side(0, 0), Side(0, 0), 0.4),
        reading(Side(0, 0), Side(0, 0), 1.4),  # nothing new: no line
        reading(Side(412, 3), Side(1250, 2), 12.2),
        {},  # the canary ended between two readings
    ]
    assert cli.main(["deploy", "--canary", "25%"]) == 0
    out = capsys.readouterr().out.splitlines()
    canary = [line for line in out if line.startswith("  canary:")]
    assert canary == [
        "  canary: 0.0% of answers (25% asked); new 0/0 5xx (0.0%), old 0/0 (0.0%); 0/60 s",
        "  canary: 24.8% of answers (25% asked); new 3/412 5xx (0.7%), old 2/1250 (0.2%); 12/60 s",
    ]
    steps = [match[1] for line in out if (match := re.match(r" +[0-9.]+s  (\S+)", line))]
    assert steps == ["health", "canary", "switch"]
    assert out.index(canary[0]) > next(i for i, line in enumerate(out) if "canary (port" in line)
    assert daemon.deployed == [("", 0.25)]


def test_a_canary_is_shown_at_most_every_few_seconds(
        daemon: StubClient, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(common, "CANARY_EVERY", 3600.0)
    daemon.readings = [reading(Side(n, 0), Side(3 * n, 0), n / 10) for n in range(1, 6)]
    assert cli.main(["deploy", "--canary", "25%"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "canary:" in line]
    assert lines == ["  canary: 25.0% of answers (25% asked); new 0/1 5xx (0.0%), old 0/3 (0.0%); 0/60 s"]


def test_a_quiet_canary_is_shown_again_as_time_goes_by(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "CANARY_EVERY", 3600.0)
    progress = common.CanaryProgress()
    first, later = reading(Side(0, 0), Side(0, 0), 1.0), reading(Side(0, 0), Side(0, 0), 31.0)
    assert progress.line(first) is not None
    assert progress.line(later) is None
    monkeypatch.setattr(common, "CANARY_QUIET", 0.0)
    assert progress.line(later) == ("canary: 0.0% of answers (25% asked); new 0/0 5xx (0.0%), "
                                    "old 0/0 (0.0%); 31/60 s")


def test_following_as_json_prints_the_record_alone(daemon: StubClient,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    daemon.readings = [reading(Side(4, 0), Side(12, 0), 2.0)]
    assert cli.main(["deploy", "--canary", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == RECORD


def test_the_client_reads_the_canary_property_of_its_apps_object() -> None:
    asked: list[Message] = []

    class Bus:
        async def call(self, message: Message) -> Message:
            asked.append(message)
            return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="v",
                           body=[Variant("a{sv}", {"share": Variant("d", 0.25),
                                                   "canary_requests": Variant("t", 4)})])

    got = asyncio.run(Client(Bus(), "staging").canary())  # type: ignore[arg-type]
    assert got == {"share": 0.25, "canary_requests": 4}
    assert [(m.path, m.interface, m.member, m.body) for m in asked] == [
        ("/org/bluegreen1/app/staging", "org.freedesktop.DBus.Properties", "Get",
         ["org.bluegreen1.Manager", "Canary"])]


def test_promote_says_what_it_did(daemon: StubClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["promote"]) == 0
    assert daemon.promoted == 1
    assert capsys.readouterr().out.startswith("Deployment 7: canary promoted; the switch")
    assert cli.main(["promote", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": "7", "promoted": True}
    assert daemon.promoted == 2


def test_promote_without_a_canary_fails_with_the_daemons_message(
        daemon: StubClient, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.no_canary = True
    assert cli.main(["promote"]) == 1
    assert capsys.readouterr().err == "bluegreenctl: no canary is under way: nothing to promote\n"
