"""The HAProxy forwarder's configuration and its switch over the runtime API (a fake one)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from bluegreen.config import DEFAULT_APP, AppConfig, Config, Forwarder, PortsConfig
from bluegreen.forwarders import control, haproxy
from bluegreen.systemd import UnitStatus


def write_env(run_dir: Path, ports: PortsConfig, drain_timeout: float) -> None:
    """The default app's forwarder settings, written by its Forwarders object."""
    config = replace(Config(), ports=ports, drain_timeout=drain_timeout)
    control.Forwarders(None, run_dir, DEFAULT_APP).write_env(config)  # type: ignore[arg-type]


STATE_HEADER = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state "
                "srv_uweight srv_iweight srv_time_since_last_change\n")


@pytest.mark.parametrize(("address", "bind"), [
    ("::", "bind :::5000 v4v6"),  # both stacks, as socat's ipv6-v6only=0
    ("0.0.0.0", "bind 0.0.0.0:5000"),
    ("127.0.0.1", "bind 127.0.0.1:5000"),
    ("::1", "bind ::1:5000 v6only"),
])
def test_haproxy_listens_on_the_public_address(address: str, bind: str) -> None:
    text = haproxy.config(address, 5000, 64, 30)
    assert f"\n    {bind}\n" in text
    assert "\n    maxconn 64\n" in text
    assert "\n    hard-stop-after 30s\n" in text


def test_the_client_cannot_choose_its_forwarded_headers() -> None:
    lines = [line.strip() for line in haproxy.config("::", 5000, 64, 30).splitlines()]
    # Removed before haproxy adds its own, so the app sees exactly one: the client's address.
    assert lines.index("http-request del-header X-Forwarded-For") < lines.index("option forwardfor")
    assert "http-request set-header X-Forwarded-Proto http" in lines
    assert "stats socket fd@3 level admin" in lines


def test_the_serving_file_names_the_instance() -> None:
    text = haproxy.serving_config(8123)
    assert "backend app" in text and "server p8123 127.0.0.1:8123" in text
    # By weight: a canary's share (a switch readies the new server and drains the old one in
    # one line of the runtime API, so that no client goes back and forth meanwhile).
    assert "balance roundrobin" in text


def test_forwarder_env_writes_haproxys_listener_too(tmp_path: Path) -> None:
    from bluegreen.config import PortsConfig
    write_env(tmp_path, PortsConfig(public=5050, public_address="127.0.0.1", max_connections=9), 12)
    text = (tmp_path / "haproxy.cfg").read_text()
    assert "bind 127.0.0.1:5050" in text and "maxconn 9" in text and "hard-stop-after 12s" in text


def test_only_haproxy_is_trusted_with_forwarded_headers_by_default() -> None:
    assert control.trusted_proxies(Config()) == ""
    assert control.trusted_proxies(Config(forwarder=Forwarder.PROXY)) == ""
    assert control.trusted_proxies(Config(forwarder=Forwarder.HAPROXY)) == "127.0.0.1"
    admin = AppConfig(forwarded_allow_ips="10.0.0.1")
    assert control.trusted_proxies(Config(forwarder=Forwarder.HAPROXY, app=admin)) == "10.0.0.1"
    assert control.trusted_proxies(Config(app=admin)) == "10.0.0.1"


def test_servers_state_and_sessions_are_read() -> None:
    text = STATE_HEADER + "3 app 1 p8001 127.0.0.1 2 8 1 1 0\n3 app 2 p8002 127.0.0.1 2 0 1 1 0\n"
    servers = haproxy.parse_servers_state(text)
    assert servers == {"p8001": haproxy.Server("p8001", 8001, 8),
                       "p8002": haproxy.Server("p8002", 8002, 0)}
    assert not servers["p8001"].ready and servers["p8002"].ready
    stat = ("# pxname,svname,qcur,qmax,scur,smax\npublic,FRONTEND,,,3,4\n"
            "app,p8001,1,1,2,2\napp,p8002,0,0,0,1\napp,BACKEND,0,0,2,2\n")
    assert haproxy.parse_sessions(stat, "p8001") == 3
    assert haproxy.parse_sessions(stat, "p8002") == 0
    assert haproxy.parse_sessions(stat, "p9999") == 0


class FakeHaproxy:
    """A runtime API on a unix socket that keeps servers as haproxy does, and logs commands."""

    def __init__(self, servers: dict[int, int], busy: dict[int, int] | None = None) -> None:
        self.servers = dict(servers)  # port -> admin state
        self.busy = dict(busy or {})  # port -> `show stat` polls with a session left
        self.commands: list[str] = []
        self.infos: list[dict[str, str]] = []  # what each `show info` answers (the last one stays)
        self.weights: dict[int, int] = {}

    def answer(self, line: str) -> str:
        if ";" in line:  # several commands in one line: run in order, answers joined
            return "".join(self.answer(part.strip()) for part in line.split(";"))
        self.commands.append(line)
        if line == "show info":
            info = self.infos.pop(0) if len(self.infos) > 1 else self.infos[0]
            return "".join(f"{name}: {value}\n" for name, value in info.items())
        words = line.split()
        port = int(words[2].split("/p")[1]) if len(words) > 2 and "/p" in words[2] else 0
        if line == "show servers state app":
            return STATE_HEADER + "".join(f"3 app {i} p{p} 127.0.0.1 2 {s} 1 1 0\n"
                                          for i, (p, s) in enumerate(self.servers.items()))
        if line == "show stat":
            rows = ""
            for p in self.servers:
                left = self.busy.get(p, 0)
                self.busy[p] = max(left - 1, 0)
                rows += f"app,p{p},0,0,{1 if left else 0},1\n"
            return "# pxname,svname,qcur,qmax,scur,smax\n" + rows
        if words[:2] == ["add", "server"]:
            self.servers[port] = 1
            return "New server registered."
        if words[:2] == ["set", "server"] and port in self.servers and words[3] == "weight":
            self.weights[port] = int(words[4])
            return ""
        if words[:2] == ["set", "server"] and port in self.servers:
            self.servers[port] = {"ready": 0, "drain": 8, "maint": 1}[words[4]]
            return ""
        if words[:2] == ["del", "server"] and self.servers.get(port) == 1:
            del self.servers[port]
            return "Server deleted."
        return "No such server."

    async def serve(self, path: Path) -> asyncio.AbstractServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = (await reader.readline()).decode().strip()
            writer.write(self.answer(line).encode() + b"\n")
            await writer.drain()
            writer.close()

        return await asyncio.start_unix_server(handle, str(path))


def run_with(fake: FakeHaproxy, tmp_path: Path, action: object) -> None:
    async def main() -> None:
        server = await fake.serve(tmp_path / haproxy.SOCKET)
        try:
            await action(haproxy.RuntimeApi(tmp_path))  # type: ignore[operator]
        finally:
            server.close()

    asyncio.run(main())


def test_a_switch_adds_the_new_server_and_drains_the_old(tmp_path: Path) -> None:
    fake = FakeHaproxy({8001: 0})
    run_with(fake, tmp_path, lambda api: haproxy.switch(api, 8002))
    assert fake.servers == {8001: 8, 8002: 0}
    assert fake.commands[1:] == ["add server app/p8002 127.0.0.1:8002",
                                 "set server app/p8002 state ready",
                                 "set server app/p8001 state drain"]


def test_a_canary_readies_the_new_server_beside_the_old_each_weighed_by_its_share(
        tmp_path: Path) -> None:
    fake = FakeHaproxy({8001: 0})
    run_with(fake, tmp_path, lambda api: haproxy.canary(api, 8002, {8001: 750, 8002: 250}))
    assert fake.servers == {8001: 0, 8002: 0}  # both ready
    assert fake.weights == {8001: 192, 8002: 64}  # of haproxy's 256
    assert fake.commands[-1] == "set server app/p8002 state ready"  # once weighed
    run_with(fake, tmp_path, lambda api: haproxy.switch(api, 8002))  # promoted
    assert fake.servers == {8001: 8, 8002: 0}


def test_a_switch_back_makes_the_draining_server_ready_again(tmp_path: Path) -> None:
    fake = FakeHaproxy({8001: 8, 8002: 0})
    run_with(fake, tmp_path, lambda api: haproxy.switch(api, 8001))
    assert fake.servers == {8001: 0, 8002: 8}
    assert not [c for c in fake.commands if c.startswith("add")]


def test_retiring_waits_until_the_server_carries_nothing(tmp_path: Path) -> None:
    fake = FakeHaproxy({8001: 8, 8002: 0}, busy={8001: 3})
    run_with(fake, tmp_path, lambda api: haproxy.retire(api, 8001, time.monotonic() + 30))
    assert fake.servers == {8002: 0}
    assert fake.commands.count("show stat") == 4  # three with a session, one without
    assert fake.commands[-2:] == ["set server app/p8001 state maint", "del server app/p8001"]


def test_retiring_stops_waiting_at_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that never ends: retire polls until the deadline (a clock of forwarders/haproxy.py's own
    that ticks once per look), then deletes the server all the same."""
    fake = FakeHaproxy({8001: 8, 8002: 0}, busy={8001: 10**6})
    ticks = itertools.count()
    monkeypatch.setattr(haproxy, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    monkeypatch.setattr(haproxy, "POLL", 0)
    run_with(fake, tmp_path, lambda api: haproxy.retire(api, 8001, 3))
    assert fake.commands.count("show stat") == 4  # at the clock's 0, 1, 2, 3: then it gave up
    assert fake.busy[8001] > 0
    assert fake.servers == {8002: 0}


def test_an_api_that_does_not_answer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(haproxy.HaproxyError, match="runtime API"):
        asyncio.run(haproxy.RuntimeApi(tmp_path).servers())


def test_the_settings_carry_a_digest_that_show_info_reports(tmp_path: Path) -> None:
    write_env(tmp_path, PortsConfig(public=5000), 30)
    first = haproxy.written_description(tmp_path)
    assert first.startswith(haproxy.DESCRIPTION)
    write_env(tmp_path, PortsConfig(public=5000), 30)
    assert haproxy.written_description(tmp_path) == first  # the same settings, the same digest
    for ports, drain in ((PortsConfig(public=5100), 30), (PortsConfig(public=5000, max_connections=99), 30),
                         (PortsConfig(public=5000), 5)):
        write_env(tmp_path, ports, drain)
        assert haproxy.written_description(tmp_path) != first, (ports, drain)
    info = haproxy.parse_info("Name: HAProxy\nPid: 12627\nnode: vm\ndescription: " + first + "\n")
    assert info["Pid"] == "12627" and info["description"] == first


def test_a_reload_is_over_once_a_new_worker_has_the_new_settings(tmp_path: Path) -> None:
    fake = FakeHaproxy({8001: 0})
    fake.infos = [{"Pid": "10", "description": "old"}, {"Pid": "10", "description": "old"},
                  {"Pid": "11", "description": "new"}]
    run_with(fake, tmp_path, lambda api: haproxy.reloaded(api, "10", "new", time.monotonic() + 30))
    assert fake.commands == ["show info"] * 3


def test_a_reload_that_does_not_happen_is_a_clear_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHaproxy({8001: 0})
    fake.infos = [{"Pid": "10", "description": "old"}]
    monkeypatch.setattr(haproxy, "POLL", 0)
    with pytest.raises(haproxy.HaproxyError, match="did not reload: its worker 10 has settings 'old'"):
        run_with(fake, tmp_path, lambda api: haproxy.reloaded(api, "10", "new", time.monotonic() + 0.2))


class RefusingHaproxy(FakeHaproxy):
    """Refuses to make the server of one port ready: a runtime switch that fails half way."""

    def __init__(self, servers: dict[int, int], refuse: int) -> None:
        super().__init__(servers)
        self.refuse = refuse

    def answer(self, line: str) -> str:
        if line == f"set server app/p{self.refuse} state ready":
            self.commands.append(line)
            return "Can't set state: the server is being deleted."
        return super().answer(line)


class RunningHaproxy:
    """systemd with haproxy running and nothing else."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def status(self, unit: str) -> UnitStatus:
        running = unit == haproxy.UNIT and unit not in self.stopped
        return UnitStatus(unit, "active" if running else "inactive", "running" if running else "dead")

    async def stop_unit(self, unit: str, **_: object) -> None:
        self.stopped.append(unit)

    async def reset_failed(self, unit: str) -> None:
        pass


def test_a_failed_runtime_switch_is_undone_in_haproxy_and_in_its_serving_file(tmp_path: Path) -> None:
    write_env(tmp_path, PortsConfig(public=5000), 30)
    haproxy.write_serving(tmp_path, 8001)
    fake = RefusingHaproxy({8001: 0}, refuse=8002)
    fake.infos = [{"Pid": "10", "description": haproxy.written_description(tmp_path)}]
    systemd = RunningHaproxy()

    async def failed_switch(api: haproxy.RuntimeApi) -> None:
        with pytest.raises(control.ForwarderError, match="Can't set state"):
            await control.start(systemd, tmp_path, 8002, 5000, Forwarder.HAPROXY)  # type: ignore[arg-type]
        await control.undo_switch(systemd, tmp_path, Forwarder.HAPROXY, [8002], [8001], 1.0)  # type: ignore[arg-type]

    run_with(fake, tmp_path, failed_switch)
    assert (tmp_path / haproxy.SERVING).read_text() == haproxy.serving_config(8001)  # a restart serves 8001
    assert fake.servers == {8001: 0}  # ready again, the new server gone
    assert haproxy.UNIT not in systemd.stopped


def test_a_haproxy_the_failed_switch_started_stops_again(tmp_path: Path) -> None:
    write_env(tmp_path, PortsConfig(public=5000), 30)
    haproxy.write_serving(tmp_path, 8002)
    fake = FakeHaproxy({8002: 0})  # started by the switch: it knows only the new server
    systemd = RunningHaproxy()
    run_with(fake, tmp_path, lambda api: control.undo_switch(
        systemd, tmp_path, Forwarder.HAPROXY, [8002], [8001], 1.0))  # type: ignore[arg-type]
    assert haproxy.UNIT in systemd.stopped and haproxy.SOCKET_UNIT in systemd.stopped
    assert (tmp_path / haproxy.SERVING).read_text() == haproxy.serving_config(8001)
