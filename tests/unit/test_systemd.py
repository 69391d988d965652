"""Job tracking: a JobRemoved that arrives before the StartUnit reply is not lost."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, Variant

from bluegreen.systemd import JobFailed, Systemd, UnitStatus


def job_removed(job: str, result: str) -> Message:
    return Message.new_signal("/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                              "JobRemoved", "uoss", [1, job, "x.service", result])


class Bus:
    """Answers StartUnit with a job path, delivering JobRemoved before or after the reply."""

    def __init__(self, early: bool, result: str = "done") -> None:
        self.early = early
        self.result = result
        self.handlers: list[Any] = []

    def add_message_handler(self, handler: Any) -> None:
        self.handlers.append(handler)

    async def call(self, message: Message) -> Message:
        job = "/org/freedesktop/systemd1/job/7"
        message.serial = 1  # as if sent
        if message.member == "StartUnit":
            if self.early:
                for handler in self.handlers:
                    handler(job_removed(job, self.result))
            else:
                asyncio.get_running_loop().call_later(
                    0.01, lambda: [h(job_removed(job, self.result)) for h in self.handlers])
            return Message.new_method_return(message, "o", [job])
        return Message.new_method_return(message)


@pytest.mark.parametrize("early", [True, False])
def test_start_unit_sees_its_job_finish(early: bool) -> None:
    systemd = Systemd(Bus(early))  # type: ignore[arg-type]
    systemd._subscribed = True
    systemd.bus.add_message_handler(systemd._on_message)
    asyncio.run(systemd.start_unit("x.service", timeout=1))


def test_a_failed_job_names_the_unit_and_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = Systemd(Bus(early=True, result="failed"))  # type: ignore[arg-type]
    systemd._subscribed = True
    systemd.bus.add_message_handler(systemd._on_message)

    async def status(unit: str) -> UnitStatus:
        return UnitStatus(unit, "failed", "failed", result="exit-code", exec_main_status=4)

    monkeypatch.setattr(systemd, "status", status)
    with pytest.raises(JobFailed, match=r"start of x\.service ended with job result 'failed': "
                                        r"exited with status 4"):
        asyncio.run(systemd.start_unit("x.service", timeout=1))


def test_a_units_active_state_change_reaches_the_listeners() -> None:
    systemd = Systemd(Bus(early=True))  # type: ignore[arg-type]
    heard: list[tuple[str, str]] = []
    systemd.on_unit_state.append(lambda unit, state: heard.append((unit, state)))
    changed = Message.new_signal(
        "/org/freedesktop/systemd1/unit/bluegreen_2dapp_408123_2eservice",
        "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
        ["org.freedesktop.systemd1.Unit", {"ActiveState": Variant("s", "deactivating")}, []])
    systemd._on_message(changed)
    assert heard == [("bluegreen-app@8123.service", "deactivating")]


class DropInBus:
    """systemd as far as drop-ins go: a loaded unit sees the drop-ins it was loaded with,
    until a Reload."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: list[str] = []
        self.loaded_text: dict[str, str] = {}
        self.reloads = 0

    def add_message_handler(self, handler: Any) -> None:
        pass

    async def call(self, message: Message) -> Message:
        message.serial = 1
        if message.member == "Reload":
            self.reloads += 1
            self.seen = [str(p) for p in sorted(self.root.glob("*.d/*.conf"))]
            self.loaded_text = {p: Path(p).read_text() for p in self.seen}
            return Message.new_method_return(message)
        if message.member == "LoadUnit":
            return Message.new_method_return(message, "o", ["/org/freedesktop/systemd1/unit/x"])
        _interface, name = message.body
        if name == "DropInPaths":
            return Message.new_method_return(message, "v", [Variant("as", self.seen)])
        changed = any(Path(p).read_text() != text for p, text in self.loaded_text.items())
        return Message.new_method_return(message, "v", [Variant("b", changed)])


def test_a_drop_in_is_written_and_systemd_reloaded_only_when_it_does_not_see_it(tmp_path: Path) -> None:
    bus = DropInBus(tmp_path)
    systemd = Systemd(bus, runtime_units=tmp_path)  # type: ignore[arg-type]
    dropin = tmp_path / "bluegreen-app@8123.service.d" / "50-x.conf"

    asyncio.run(systemd.set_dropin("bluegreen-app@8123.service", "50-x.conf", "[Service]\nA=1\n"))
    assert dropin.read_text() == "[Service]\nA=1\n"
    assert bus.reloads == 1  # a new drop-in directory: systemd sees it after a reload only
    written = dropin.stat().st_mtime_ns
    asyncio.run(systemd.set_dropin("bluegreen-app@8123.service", "50-x.conf", "[Service]\nA=1\n"))
    assert bus.reloads == 1 and dropin.stat().st_mtime_ns == written  # the same: left alone
    asyncio.run(systemd.set_dropin("bluegreen-app@8123.service", "50-x.conf", "[Service]\nA=2\n"))
    assert bus.reloads == 2 and dropin.read_text() == "[Service]\nA=2\n"


def test_removing_a_drop_in_keeps_what_else_is_in_its_directory(tmp_path: Path) -> None:
    systemd = Systemd(DropInBus(tmp_path), runtime_units=tmp_path)  # type: ignore[arg-type]
    for unit in ("a.service", "b.service"):
        asyncio.run(systemd.set_dropin(unit, "50-x.conf", "[Service]\n"))
    (tmp_path / "b.service.d" / "60-admin.conf").write_text("[Service]\n")
    systemd.remove_dropin("a.service", "50-x.conf")
    systemd.remove_dropin("b.service", "50-x.conf")
    systemd.remove_dropin("c.service", "50-x.conf")  # never written: nothing to do
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "b.service.d", "b.service.d/60-admin.conf"]
