"""The controller's start: it owns its bus name even when the bus has not yet seen the previous
controller leave (a restart), and refuses to run beside another one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbus_next.constants import RequestNameReply

from bluegreen import daemon


class Bus:
    """A bus on which the name is held by someone else for ``held`` more requests."""

    def __init__(self, held: int) -> None:
        self.held = held
        self.requests = 0

    async def request_name(self, name: str) -> RequestNameReply:
        self.requests += 1
        if self.requests == 1 and self.held == 0:
            return RequestNameReply.PRIMARY_OWNER
        if self.requests <= self.held:
            return RequestNameReply.IN_QUEUE
        return RequestNameReply.ALREADY_OWNER  # queued first, owner now


def own(bus: Any) -> RequestNameReply:
    return asyncio.run(daemon.own_name(bus))


def test_the_name_is_owned_at_once_when_free() -> None:
    assert own(Bus(held=0)) == RequestNameReply.PRIMARY_OWNER


def test_a_restart_waits_in_the_queue_for_the_previous_controller_to_leave() -> None:
    bus = Bus(held=3)
    assert own(bus) == RequestNameReply.ALREADY_OWNER and bus.requests == 4


def test_a_name_held_for_good_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "NAME_WAIT", 0.2)
    assert own(Bus(held=10**6)) == RequestNameReply.IN_QUEUE
