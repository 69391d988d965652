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


class Restarting:
    """An instance's unit as systemd shows it after ``restarts`` automatic restarts."""

    def __init__(self, state: str, sub_state: str, restarts: int, result: str = "") -> None:
        self.unit_status = UnitStatus(instances.unit(PORT), state, sub_state, result=result,
                                      exec_main_status=1, restarts=restarts)

    async def status(self, unit: str) -> UnitStatus:
        return self.unit_status


@pytest.mark.parametrize(("state", "sub_state", "restarts", "failed"), [
    ("activating", "start", 0, None),  # booting
    ("active", "running", 0, None),
    ("activating", "start", 1, "restarted by systemd (1 time)"),  # booting again after a death
    ("active", "running", 2, "restarted by systemd (2 times)"),
    ("activating", "auto-restart", 1, "restarted by systemd (1 time)"),
    ("failed", "failed", 0, "exited with status 1"),
])
def test_a_new_instance_that_died_while_starting_has_failed(
        state: str, sub_state: str, restarts: int, failed: str | None) -> None:
    # gunicorn 20.1 exits 1, not 3, when a second worker fails to boot while it halts for the
    # first (an ASGI app's lifespan startup that fails in every worker): systemd restarts it,
    # and a check that looks only between two restarts sees it running.
    systemd = Restarting(state, sub_state, restarts, "exit-code" if state == "failed" else "")
    found = asyncio.run(instances.boot_failure(systemd, PORT))  # type: ignore[arg-type]
    if failed is None:
        assert found is None
    else:
        assert found is not None and failed in found, found
