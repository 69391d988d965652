"""forwarder = "direct": the instances' own listeners on the public port, steered by the
group's program (forwarders/direct.py, the controller's side; forwarders/directhook.py, the
units' hooks). Real listeners in a real SO_REUSEPORT group, stand-ins for the instances."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bluegreen.config import DEFAULT_APP, AppConfig, Config, Forwarder, PortsConfig
from bluegreen.forwarders import control, direct, directhook, hook
from bluegreen.instances import ASGI_WORKER_CLASS, INSTANCE_KEYS, InstanceSpec
from tests.unit.test_reuseport import Forwarder as StandIn
from tests.unit.test_reuseport import spread

Instance = StandIn  # a process that holds a listener of the group and accepts nothing


@pytest.fixture
def instances(run_dir: Path) -> Iterator[Callable[[int], Instance]]:
    """Start instances in turn on one public port; each is recorded by its ExecStartPost hook."""
    started: list[Instance] = []

    def start(target: int) -> Instance:
        instance = Instance(started[0].port if started else 0)
        started.append(instance)
        assert "socket" in directhook.joined(instance.pid, instance.port, target)
        return instance

    yield start
    for instance in started:
        instance.stop()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(hook, "RUN_DIR", tmp_path, raising=False)
    return tmp_path


def switch(run_dir: Path, port: int, **change: list[int]) -> None:
    """What the controller does: write what the group admits, then start the steering unit."""
    direct.admit(run_dir, port, **change)
    directhook.steer(port)


def test_an_instance_gets_nothing_until_the_switch_admits_it(
        run_dir: Path, instances: Callable[[int], Instance]) -> None:
    old = instances(8001)
    switch(run_dir, old.port, add=[8001])
    new = instances(8002)  # started, not yet proven healthy
    assert spread(old.port, [old, new]) == [60, 0]
    assert direct.targets(run_dir, old.port) == {8001: True, 8002: False}
    switch(run_dir, old.port, add=[8002], remove=[8001])
    assert spread(old.port, [old, new]) == [0, 60]
    switch(run_dir, old.port, only=[8001])  # a switch back
    assert spread(old.port, [old, new]) == [60, 0]


def test_two_instances_share_and_a_third_waits_for_its_switch(
        run_dir: Path, instances: Callable[[int], Instance]) -> None:
    a, b = instances(8001), instances(8002)
    switch(run_dir, a.port, add=[8001, 8002])
    c, d = instances(8003), instances(8004)
    got = spread(a.port, [a, b, c, d])
    assert got[2:] == [0, 0] and min(got[:2]) > 0, got
    switch(run_dir, a.port, only=[8003, 8004])
    got = spread(a.port, [a, b, c, d])
    assert got[:2] == [0, 0] and min(got[2:]) > 0, got
    a.stop()  # the old instances stop: the last listener fills each hole, the program follows
    directhook.left(a.port, 8001)
    b.stop()
    directhook.left(a.port, 8002)
    got = spread(c.port, [c, d])
    assert sum(got) == 60 and min(got) > 0, got


def test_old_instances_get_nothing_while_they_leave_the_group(
        run_dir: Path, instances: Callable[[int], Instance]) -> None:
    """The old instances stop one after the other: the kernel moves the group's last listener
    into the slot of each one that leaves, before its ExecStopPost= can steer again. The
    program their ExecStop= set stays right across that move: no new connection reaches the
    old instance still there, and none is left to the kernel's hash."""
    a, b = instances(8001), instances(8002)
    switch(run_dir, a.port, add=[8001, 8002])
    c, d = instances(8003), instances(8004)
    switch(run_dir, a.port, only=[8003, 8004])
    for old, target, rest in ((a, 8001, [b, c, d]), (b, 8002, [c, d])):
        directhook.stopping(a.port, target)  # ExecStop=: before gunicorn closes its listener
        old.stop()  # the last listener takes its slot
        got = spread(c.port, rest)
        assert sum(got) == 60 and got[:-2] == [0] * (len(rest) - 2), (target, got)
        directhook.left(a.port, target)  # ExecStopPost=
    got = spread(c.port, [c, d])
    assert sum(got) == 60 and min(got) > 0, got


def test_a_lone_receiver_in_the_last_slot_is_followed_as_old_instances_leave(
        run_dir: Path, instances: Callable[[int], Instance]) -> None:
    """app.instances lowered from 2 to 1: the one new listener is the group's last, which
    moves into the slot of the first old one to leave, and no program names it in both
    slots. ExecStop= then stops gunicorn itself and follows the move as soon as it is made."""
    a, b = instances(8001), instances(8002)
    switch(run_dir, a.port, add=[8001, 8002])
    c = instances(8003)
    switch(run_dir, a.port, only=[8003])
    for old, target, rest in ((a, 8001, [b, c]), (b, 8002, [c])):
        said = directhook.stopping(a.port, target, pid=old.pid)  # ExecStop=
        assert "left" in said, said
        old.stop()  # systemd's SIGTERM after ExecStop=: gone already
        assert spread(c.port, rest)[:-1] == [0] * (len(rest) - 1), target
        directhook.left(a.port, target)  # ExecStopPost=
    assert spread(c.port, [c]) == [60]


def test_a_dead_instance_is_steered_around_until_it_is_back(
        run_dir: Path, instances: Callable[[int], Instance]) -> None:
    a, b = instances(8001), instances(8002)
    switch(run_dir, a.port, add=[8001, 8002])
    # b's gunicorn died; systemd still holds its listener (the socket unit) and says so
    # (ExecStopPost=): its share goes to a until the restarted gunicorn has joined again.
    directhook.left(a.port, 8002)
    assert direct.targets(run_dir, a.port) == {8001: True, 8002: False}
    assert spread(a.port, [a, b]) == [60, 0]
    directhook.joined(b.pid, b.port, 8002)
    got = spread(a.port, [a, b])
    assert min(got) > 0, got


def test_the_drain_waits_for_the_queue_of_an_instance_no_longer_admitted(
        run_dir: Path, instances: Callable[[int], Instance]) -> None:
    old = instances(8001)
    switch(run_dir, old.port, add=[8001])
    spread(old.port, [old])  # queued on it, never accepted: the stand-in accepts nothing
    queued, _connected = directhook.drain(8001, old.port, timeout=0.2)
    assert queued > 0  # still queued at the timeout: a drain never says done too early


class DropIns:
    """The part of bluegreen.systemd.Systemd that prepare uses: drop-ins, by unit."""

    def __init__(self) -> None:
        self.written: dict[str, str] = {}

    async def set_dropin(self, unit: str, name: str, text: str) -> None:
        self.written[unit] = text

    def remove_dropin(self, unit: str, name: str) -> None:
        self.written.pop(unit, None)


def test_an_instance_listens_on_the_public_address_of_both_stacks(tmp_path: Path) -> None:
    systemd = DropIns()
    forwarders = control.Forwarders(systemd, tmp_path, DEFAULT_APP)  # type: ignore[arg-type]
    config = replace(Config(), forwarder=Forwarder.DIRECT,
                     ports=PortsConfig(public=free_port(), public_address="::"))
    asyncio.run(forwarders.prepare_instance(8001, config))
    socket_text = systemd.written["bluegreen-app-public@8001.socket"]
    assert f"ListenStream=[::]:{config.ports.public}\nBindIPv6Only=both" in socket_text
    service_text = systemd.written["bluegreen-app@8001.service"]
    assert "Sockets=bluegreen-app-public@%i.socket" in service_text
    assert f"directhook joined $MAINPID {config.ports.public} %i" in service_text
    asyncio.run(forwarders.prepare_instance(8001, replace(config, forwarder=Forwarder.SOCAT)))
    assert systemd.written == {}  # another forwarder: its own port alone


def test_an_instance_does_not_start_beside_another_users_listener(tmp_path: Path) -> None:
    """A forwarder of another kind listens as its own user: the kernel would refuse the
    instance's listener, so the deploy is refused first, saying why."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to listen as another user")
    port = free_port()
    script = ("import os, socket, sys; os.setuid(65534); s = socket.socket(); "
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); "
              f"s.bind(('127.0.0.1', {port})); s.listen(); print(1, flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "1"
        forwarders = control.Forwarders(DropIns(), tmp_path, DEFAULT_APP)  # type: ignore[arg-type]
        config = replace(Config(), forwarder=Forwarder.DIRECT, ports=PortsConfig(public=port))
        with pytest.raises(control.ForwarderError, match="another kind of forwarder"):
            asyncio.run(forwarders.prepare_instance(8001, config))
    finally:
        other.kill()
        other.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_switch_to_an_instance_the_record_does_not_have_fails(tmp_path: Path) -> None:
    """Its start hook did not record its listener: the program cannot send it anything, so
    the switch fails (and the deploy switches back) rather than report a switch that was not."""
    started: list[str] = []

    class Units(DropIns):
        async def start_unit(self, unit: str, **_: object) -> None:
            started.append(unit)

    forwarders = control.Forwarders(Units(), tmp_path, DEFAULT_APP)  # type: ignore[arg-type]
    config = replace(Config(), forwarder=Forwarder.DIRECT)
    with pytest.raises(control.ForwarderError, match=r"port 8002 .* not in the port's steering record"):
        asyncio.run(forwarders.switch_to([8002], config))
    assert started == [f"bluegreen-direct-steer@{config.ports.public}.service"]


def test_the_drain_timeout_runs_from_the_drain_flag(run_dir: Path,
                                                    instances: Callable[[int], Instance]) -> None:
    old = instances(8001)
    switch(run_dir, old.port, add=[8001])
    spread(old.port, [old])  # queued for good: the stand-in accepts nothing
    flag = hook.drain_flag(8001)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    os.utime(flag, (time.time() - 5, time.time() - 5))  # raised 5 s ago
    started = time.monotonic()
    directhook.drain(8001, old.port, timeout=6)
    assert time.monotonic() - started < 3


def test_max_connections_is_shared_by_an_instances_threaded_workers() -> None:
    """No forwarder counts the connections: each instance's gthread workers share
    ports.max_connections (as each instance's own socat would allow), rounded up."""
    def limit(forwarder: Forwarder, worker_class: str, max_connections: int = 1024,
              workers: int = 4) -> int | None:
        config = Config(forwarder=forwarder, ports=PortsConfig(max_connections=max_connections),
                        app=AppConfig(workers=workers))
        return direct.worker_connections(config, worker_class)

    assert limit(Forwarder.DIRECT, "gthread") == 256
    assert limit(Forwarder.DIRECT, "gthread", max_connections=10) == 3
    assert limit(Forwarder.DIRECT, "gthread", max_connections=1, workers=4) == 1
    # A sync worker serves one connection at a time whatever it is told; uvicorn's only limit
    # answers 503 instead of leaving the connection queued: gunicorn's defaults stay.
    assert limit(Forwarder.DIRECT, "sync") is None
    assert limit(Forwarder.DIRECT, ASGI_WORKER_CLASS) is None
    # A forwarder counts them itself.
    assert limit(Forwarder.SOCAT, "gthread") is None


def test_the_limit_reaches_the_instances_settings() -> None:
    spec = InstanceSpec(port=8001, wsgi="app:app", workers=2, worker_class="gthread",
                        app_environment={}, worker_connections=12)
    assert spec.environment()["BLUEGREEN_WORKER_CONNECTIONS"] == "12"
    assert "BLUEGREEN_WORKER_CONNECTIONS" in INSTANCE_KEYS  # not the workers' business
    unlimited = replace(spec, worker_connections=None)
    assert "BLUEGREEN_WORKER_CONNECTIONS" not in unlimited.environment()
