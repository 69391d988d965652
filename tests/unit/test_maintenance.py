"""The maintenance page: written whole, read back, removed; a message that cannot be shown is
refused with the reason."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from dbus_next import DBusError

from bluegreen import maintenance
from bluegreen.api import dbus
from bluegreen.api.names import Error
from bluegreen.maintenance import MaintenanceError


def test_a_page_is_written_readable_by_the_front_and_read_back(tmp_path: Path) -> None:
    assert maintenance.current("blog", tmp_path) is None
    state = maintenance.turn_on("blog", "Back at <b>noon</b> & later", tmp_path)
    assert state.message == "Back at <b>noon</b> & later"
    page = maintenance.page("blog", tmp_path)
    assert "Back at &lt;b&gt;noon&lt;/b&gt; &amp; later" in page.read_text()  # escaped
    assert stat.S_IMODE(page.stat().st_mode) == 0o644
    assert stat.S_IMODE(page.parent.stat().st_mode) == 0o755
    assert maintenance.current("blog", tmp_path) == state
    assert maintenance.current("other", tmp_path) is None
    assert maintenance.turn_off("blog", tmp_path) is True
    assert maintenance.current("blog", tmp_path) is None
    assert maintenance.turn_off("blog", tmp_path) is False


def test_an_empty_message_is_the_default_one(tmp_path: Path) -> None:
    assert maintenance.turn_on("blog", "  ", tmp_path).message == maintenance.DEFAULT_MESSAGE


@pytest.mark.parametrize(("message", "reason"), [
    ("x" * (maintenance.MAX_MESSAGE + 1), "at most"),
    ("bad\x1b[31m", "control characters"),
])
def test_a_message_that_cannot_be_shown_is_refused_and_changes_nothing(
        tmp_path: Path, message: str, reason: str) -> None:
    with pytest.raises(MaintenanceError, match=reason):
        maintenance.turn_on("blog", message, tmp_path)
    assert not maintenance.page("blog", tmp_path).exists()


class _Settings:
    def __init__(self, domains: tuple[str, ...]) -> None:
        self.in_effect = SimpleNamespace(app=SimpleNamespace(domains=domains))


def _interface(domains: tuple[str, ...]) -> dbus.ManagerInterface:
    controller = SimpleNamespace(app="blog", settings=_Settings(domains), observers=[])

    async def reload() -> list[tuple[str, str]]:
        return []

    return dbus.ManagerInterface(controller, reload)  # type: ignore[arg-type]


def test_an_app_without_domains_has_no_front_to_answer_for_it() -> None:
    with pytest.raises(DBusError) as raised:
        asyncio.run(_interface(())._set_maintenance(True, ""))
    assert raised.value.type == Error.NOT_CONFIGURED.dbus_name
    assert "has no domains" in raised.value.text


def test_a_message_that_cannot_be_shown_is_an_invalid_argument() -> None:
    with pytest.raises(DBusError) as raised:
        asyncio.run(_interface(("blog.example",))._set_maintenance(True, "x\x07"))
    assert raised.value.type == Error.INVALID_ARGUMENT.dbus_name
