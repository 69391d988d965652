"""Where the forwarders listen, and with which limit (bluegreen-forward@'s socat command line);
the Forwarders object the controller's parts move them with."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bluegreen.config import DEFAULT_APP, Config, Forwarder, PortsConfig
from bluegreen.files import read_environment_file
from bluegreen.forwarders import control


def write_env(run_dir: Path, ports: PortsConfig, drain_timeout: float) -> None:
    """The default app's forwarder settings, written by its Forwarders object."""
    config = replace(Config(), ports=ports, drain_timeout=drain_timeout)
    control.Forwarders(None, run_dir, DEFAULT_APP).write_env(config)  # type: ignore[arg-type]


@pytest.mark.parametrize(("address", "listen"), [
    ("::", "TCP6-LISTEN:5000,ipv6-v6only=0"),  # both stacks
    ("0.0.0.0", "TCP4-LISTEN:5000,bind=0.0.0.0"),
    ("127.0.0.1", "TCP4-LISTEN:5000,bind=127.0.0.1"),
    ("::1", "TCP6-LISTEN:5000,bind=[::1],ipv6-v6only=1"),
])
def test_socat_listens_on_the_public_address(address: str, listen: str) -> None:
    assert control.socat_listen(address, 5000) == listen


def test_without_ipv6_both_stacks_means_ipv4() -> None:
    assert control.listen_address("::", ipv6=False) == "0.0.0.0"
    assert control.listen_address("::", ipv6=True) == "::"
    assert control.listen_address("127.0.0.1", ipv6=False) == "127.0.0.1"


def test_unset_the_address_is_both_stacks_unless_ipv4_alone_serves_already() -> None:
    assert control.listen_address("", served=()) == "::"
    assert control.listen_address("", served=("::",)) == "::"
    assert control.listen_address("", served=("0.0.0.0",)) == "0.0.0.0"
    assert control.listen_address("", served=("0.0.0.0", "::")) == "::"
    assert control.listen_address("", ipv6=False) == "0.0.0.0"
    # named, the address is the admin's choice
    assert control.listen_address("::", served=("0.0.0.0",)) == "::"


def test_the_environment_file_holds_address_and_limit(tmp_path: Path) -> None:
    write_env(tmp_path, PortsConfig(public_address="127.0.0.1", max_connections=50), 30)
    env = read_environment_file(tmp_path / "forwarder.env")
    assert env["BLUEGREEN_SOCAT_LISTEN"] == "TCP4-LISTEN:5000,bind=127.0.0.1"
    assert env["BLUEGREEN_PUBLIC_ADDRESS"] == "127.0.0.1"
    assert env["BLUEGREEN_MAX_CONNECTIONS"] == "50"
    assert env["BLUEGREEN_PUBLIC_PORT"] == "5000"


def test_the_socat_unit_passes_the_limit_and_the_address() -> None:
    unit = (Path(__file__).resolve().parents[2] / "units/bluegreen-forward@.service").read_text()
    start = unit[unit.index("\nExecStart="):unit.index("\nExecStop=")]
    assert "${BLUEGREEN_SOCAT_LISTEN}," in start
    assert "max-children=${BLUEGREEN_MAX_CONNECTIONS}" in start


def test_the_forwarders_follow_the_settings_they_are_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment switches with its own settings; a reload's apply to what follows."""
    calls: list[tuple[Any, ...]] = []

    async def start(systemd: object, run_dir: Path, port: int, public_port: int,
                    kind: Forwarder = Forwarder.SOCAT, timeout: float = 10.0,
                    app: str = "default") -> None:
        calls.append(("start", port, public_port, kind, app))

    async def drain_stop(systemd: object, run_dir: Path, port: int, timeout: float) -> None:
        calls.append(("drain", port, timeout))

    monkeypatch.setattr(control, "start", start)
    monkeypatch.setattr(control, "drain_stop", drain_stop)
    forwarders = control.Forwarders(None, tmp_path, "shop")  # type: ignore[arg-type]
    deploying = replace(Config(), ports=PortsConfig(public=6000), forwarder=Forwarder.PROXY,
                        drain_timeout=5)

    async def moves() -> None:
        await forwarders.switch_to([8002, 8003], Config())
        await forwarders.drain(8002, deploying)
        await forwarders.switch_to([8004], deploying)

    asyncio.run(moves())
    assert calls == [("start", 8002, 5000, Forwarder.SOCAT, "shop"),
                     ("start", 8003, 5000, Forwarder.SOCAT, "shop"),
                     ("drain", 8002, 5), ("start", 8004, 6000, Forwarder.PROXY, "shop")]
    written = control.env_path(tmp_path, "shop")
    forwarders.write_env(deploying)
    assert read_environment_file(written)["BLUEGREEN_PUBLIC_PORT"] == "6000"
    forwarders.write_env(Config())  # the settings in effect again, after a failed deployment
    assert read_environment_file(written)["BLUEGREEN_PUBLIC_PORT"] == "5000"
    assert read_environment_file(written)["BLUEGREEN_APP"] == "shop"


def test_a_canary_needs_the_old_releases_listeners_where_the_new_ones_go(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    forwarders = control.Forwarders(None, tmp_path, DEFAULT_APP)  # type: ignore[arg-type]
    try:
        here = Config(ports=PortsConfig(public=port, public_address="127.0.0.1"))
        assert forwarders.canary_blocker(here) is None
        moved = replace(here, ports=replace(here.ports, public_address="::"))
        assert f"moves to :::{port}" in (forwarders.canary_blocker(moved) or "")
    finally:
        listener.close()
    assert "no address" in (forwarders.canary_blocker(here) or "")  # nothing serves there
