"""Who may listen on an instance's port: its socket unit (created by systemd, owned by root)
and gunicorn, nobody else."""

from __future__ import annotations

import asyncio

import pytest

from bluegreen import instances, sockdiag
from bluegreen.systemd import UnitStatus

PORT = 8123
APP_UID = 990


class Systemd:
    def __init__(self, service_uid: int, socket_state: str) -> None:
        self.service_uid = service_uid
        self.socket_state = socket_state

    async def status(self, unit: str) -> UnitStatus:
        if unit == instances.socket_unit(PORT):
            return UnitStatus(unit, self.socket_state, "running")
        running = self.service_uid >= 0
        return UnitStatus(unit, "active" if running else "inactive", "running" if running else "dead",
                          uid=self.service_uid)


def listener(uid: int, address: str = "127.0.0.1") -> sockdiag.TcpSocket:
    return sockdiag.TcpSocket(address, PORT, "0.0.0.0", 0, sockdiag.TcpState.LISTEN, 0, uid, 4242)


@pytest.mark.parametrize(("owners", "service_uid", "socket_state", "stranger"), [
    ([0], APP_UID, "active", None),  # the socket unit's listener, gunicorn accepting on it
    ([APP_UID], APP_UID, "inactive", None),  # gunicorn bound it itself (started without its socket)
    ([0], APP_UID, "inactive", "uid 0"),  # root's, but not the instance's socket
    ([0, 65534], APP_UID, "active", "uid 65534"),  # and another user's beside it
    ([65534], APP_UID, "active", "uid 65534"),
    ([0], -1, "active", "uid 0"),  # the instance does not run: nothing there is its own
    ([], APP_UID, "active", "nothing listens"),
])
def test_only_the_instance_and_its_socket_may_hold_its_port(
        monkeypatch: pytest.MonkeyPatch, owners: list[int], service_uid: int, socket_state: str,
        stranger: str | None) -> None:
    monkeypatch.setattr(sockdiag, "listeners", lambda port: [listener(uid) for uid in owners])
    found = asyncio.run(instances.foreign_listener(Systemd(service_uid, socket_state), PORT))  # type: ignore[arg-type]
    if stranger is None:
        assert found is None
    else:
        assert found is not None and stranger in found, found


def test_socket_units_are_told_from_instances() -> None:
    assert instances.socket_port_of("bluegreen-app@8123.socket") == 8123
    assert instances.socket_port_of("bluegreen-app@8123.service") is None
    assert instances.port_of("bluegreen-app@8123.socket") is None
