"""The controller's own logic against a stand-in for systemd: what serves after a failure past
the switch, background tasks that end, the refresher's seen head, recovery that retries."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bluegreen import apps, drainflag, health, instances, ports, sockdiag, workers
from bluegreen import controller as controller_module
from bluegreen import log as logsetup
from bluegreen.appmanager import AppManager
from bluegreen.config import Config, ConfigError
from bluegreen.controller import Controller
from bluegreen.credentials import Secrets
from bluegreen.deploy import DeployFailed
from bluegreen.files import environment_file
from bluegreen.forwarders import control
from bluegreen.history import Deployment, History, State, Step, Trigger, finished
from bluegreen.parts import Parts, Paths, build
from bluegreen.recorder import Recorder
from bluegreen.refusals import Busy
from bluegreen.release import appenv
from bluegreen.release.repository import Commit, Repository
from bluegreen.release.venvs import Venvs
from bluegreen.release.verify import Verifier
from bluegreen.serving import Serving
from bluegreen.systemd import JobFailed, SystemdError, UnitStatus

OLD, NEW = "a" * 40, "b" * 40
OLD_PORT = 8001


class FakeSystemd:
    """Units and their active states; starts and stops succeed unless told otherwise."""

    def __init__(self) -> None:
        self.units: dict[str, str] = {}
        self.refuse_start: set[str] = set()
        self.unreadable: set[str] = set()
        self.on_unit_state: list[Any] = []
        self.jobs: list[tuple[str, str]] = []  # ("start" or "stop", unit), in order
        # Each unit's drop-ins, by name, and its state when they were set.
        self.dropins: dict[str, dict[str, str]] = {}
        self.state_at_dropin: dict[str, str] = {}

    def active(self, pattern: str) -> list[str]:
        return sorted(name for name, state in self.units.items()
                      if state == "active" and fnmatch.fnmatch(name, pattern))

    async def list_units(self, *patterns: str) -> list[UnitStatus]:
        return [self._status(name) for name in self.units
                if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]

    async def status(self, unit: str) -> UnitStatus:
        if unit in self.unreadable:
            raise SystemdError(f"GetAll: {unit}: Connection timed out")
        return self._status(unit)

    def _status(self, unit: str) -> UnitStatus:
        state = self.units.get(unit, "inactive")
        return UnitStatus(unit, state, "running" if state == "active" else "dead")

    async def start_unit(self, unit: str, **_: Any) -> None:
        self.jobs.append(("start", unit))
        if unit in self.refuse_start:
            raise JobFailed(unit, "start", "failed", "masked")
        self.units[unit] = "active"

    async def stop_unit(self, unit: str, **_: Any) -> None:
        self.jobs.append(("stop", unit))
        if unit in self.units:
            self.units[unit] = "inactive"

    async def reset_failed(self, unit: str) -> None:
        pass

    async def set_properties(self, unit: str, properties: Any) -> None:
        pass

    async def set_dropin(self, unit: str, name: str, text: str) -> None:
        self.dropins.setdefault(unit, {})[name] = text
        self.state_at_dropin[unit] = self.units.get(unit, "inactive")

    def remove_dropin(self, unit: str, name: str) -> None:
        self.dropins.get(unit, {}).pop(name, None)
        self.state_at_dropin[unit] = self.units.get(unit, "inactive")


def write_instance_env(run_dir: Path, port: int, release: str, deployment_id: int) -> None:
    path = instances.env_path(run_dir, port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(environment_file({"BLUEGREEN_RELEASE": release,
                                      "BLUEGREEN_DEPLOYMENT_ID": str(deployment_id)}))


class World:
    """A controller whose old release serves on OLD_PORT, and the knobs of its deploys."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 systemd: FakeSystemd | None = None, app: str = "default",
                 public: int = 5000) -> None:
        base = Config()
        config = replace(base, repository=replace(base.repository, url="/srv/app.git", watch=False),
                         health=replace(base.health, interval=0.01, unhealthy_threshold=2),
                         drain_timeout=1.0, post_switch_watch=0.3, app_name=app,
                         ports=replace(base.ports, public=public))
        self.systemd = systemd or FakeSystemd()
        self.paths = Paths(state=tmp_path / f"state-{app}", runtime=tmp_path / "run")
        self.healthy = True
        self.remote_head: str | None = NEW
        self.controller = Controller(config, self.systemd, self.paths,  # type: ignore[arg-type]
                                     self.parts(config))
        self.patch(monkeypatch)
        if systemd is not None:  # a restarted controller: it finds out for itself what serves
            return
        for sha in (OLD, NEW):
            self.controller.releases.path(sha).mkdir(parents=True)
        write_instance_env(self.paths.runtime, OLD_PORT, OLD, 1)
        self.systemd.units[instances.socket_unit(OLD_PORT)] = "active"
        self.systemd.units[instances.unit(OLD_PORT)] = "active"
        self.systemd.units[control.unit(OLD_PORT)] = "active"
        self.controller.serving = Serving(OLD_PORT, OLD)

    def parts(self, config: Config) -> Parts:
        """The controller's parts, with a repository whose remote is this world's and a verify
        step that builds nothing."""
        world = self

        class Remote(Repository):
            async def resolve(self, ref: str = "") -> Commit:
                return Commit(ref or NEW, "subject", "author", 0)

            async def remote_head(self) -> str | None:
                return world.remote_head

        class NoBuild(Verifier):
            async def environment(self, release_dir: Path) -> None:
                return None

        repository = Remote(config.repository.url, config.repository.branch, self.paths.mirror,
                            Secrets())
        return build(config, self.systemd, self.paths,  # type: ignore[arg-type]
                     repository=repository, verifier=lambda config, deployment_id: NoBuild(
                         self.systemd, config, Venvs(self.paths.environments),  # type: ignore[arg-type]
                         deployment_id))

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        async def wait_healthy(*_: Any) -> health.Probe:
            return health.Probe(True, "HTTP 200", health.HEALTH_PATH)

        async def probe(*_: Any) -> health.Probe:
            return health.Probe(self.healthy, "HTTP 200" if self.healthy else "HTTP 500")

        async def no_stranger(*_: Any) -> None:
            return None

        async def start_forwarder(systemd: FakeSystemd, run_dir: Path, port: int, public_port: int,
                                  kind: Any = None, timeout: float = 10.0, app: str = "default") -> None:
            control._link(run_dir, port, app)
            await systemd.start_unit(control.unit(port))

        monkeypatch.setattr(health, "wait_healthy", wait_healthy)
        monkeypatch.setattr(health, "probe", probe)
        monkeypatch.setattr(instances, "foreign_listener", no_stranger)
        monkeypatch.setattr(control, "ensure_migrate_req", lambda: False)
        monkeypatch.setattr(control, "start", start_forwarder)
        monkeypatch.setattr(sockdiag, "served_connections", lambda port: 0)
        monkeypatch.setattr(sockdiag, "listeners", lambda port: [])
        # The lowest free port from 8002, so that the test knows which a deploy takes.
        monkeypatch.setattr(ports, "pick", lambda _range, taken: min(set(range(8002, 8100)) - set(taken)))
        monkeypatch.setattr(appenv, "prepare_data_dir", lambda app: None)

    async def deploy(self, sha: str = NEW, trigger: Trigger = Trigger.DBUS) -> Deployment:
        record = await self.controller.request_deploy(sha, trigger)
        task = self.controller._task
        assert task is not None
        await task
        return self.controller.history.get(record.id)


async def started(controller: Controller) -> None:
    """Start ``controller`` and wait for the start-up's reconciliation, which runs in the
    background."""
    await controller.start()
    while controller._settling:
        await asyncio.sleep(0.01)


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    yield World(tmp_path, monkeypatch)


def test_a_deploy_that_succeeds_serves_the_new_release(world: World) -> None:
    record = asyncio.run(world.deploy())
    assert record.state == State.SUCCEEDED
    assert world.controller.serving == Serving(8002, NEW)
    assert world.systemd.active("bluegreen-forward@*") == ["bluegreen-forward@8002.service"]
    assert world.systemd.active(instances.PATTERN) == ["bluegreen-app@8002.service"]


def test_an_instance_port_is_held_by_its_socket_from_before_gunicorn_until_after_it(
        world: World) -> None:
    """The new instance's socket binds its port before gunicorn starts; the old one's socket
    is closed before gunicorn's graceful stop, so that gunicorn serves what waits on it and the
    port is free once the stop is done."""
    asyncio.run(world.deploy())
    jobs = world.systemd.jobs
    new_socket, new_unit = instances.socket_unit(8002), instances.unit(8002)
    old_socket, old_unit = instances.socket_unit(OLD_PORT), instances.unit(OLD_PORT)
    assert jobs.index(("start", new_socket)) < jobs.index(("start", new_unit))
    assert jobs.index(("stop", old_socket)) < jobs.index(("stop", old_unit))
    assert world.systemd.active(instances.SOCKET_PATTERN) == [new_socket]
    assert world.systemd.active(instances.PATTERN) == [new_unit]


def test_a_socket_whose_instance_does_not_run_is_closed_at_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller that died between starting an instance's socket and the instance leaves
    a port held for nothing; the restarted one closes it, and keeps what serves."""
    first = World(tmp_path, monkeypatch)
    write_instance_env(first.paths.runtime, 8005, NEW, 2)
    first.systemd.units[instances.socket_unit(8005)] = "active"
    second = World(tmp_path, monkeypatch, systemd=first.systemd)

    async def restarted() -> None:
        controller = second.controller
        await started(controller)
        assert controller.serving == Serving(OLD_PORT, OLD)
        await controller.stop()

    asyncio.run(restarted())
    assert first.systemd.active(instances.SOCKET_PATTERN) == [instances.socket_unit(OLD_PORT)]
    assert not instances.env_path(first.paths.runtime, 8005).exists()


def test_a_new_instance_gets_its_apps_secrets_before_it_starts_and_an_old_one_loses_them(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps, "SECRETS_DIR", tmp_path / "secrets")
    (tmp_path / "secrets" / "staging").mkdir(parents=True)
    (tmp_path / "secrets" / "TOKEN").write_text("production\n")
    assert asyncio.run(world.deploy()).state == State.SUCCEEDED
    unit = instances.unit(8002)
    assert world.systemd.dropins[unit] == {appenv.SECRETS_DROPIN: appenv.secrets_dropin("default")}
    assert f"LoadCredential=secrets_TOKEN:{tmp_path}/secrets/TOKEN\n" in appenv.secrets_dropin("default")
    assert world.systemd.state_at_dropin[unit] == "inactive"
    # The old instance, stopped, keeps no drop-in.
    assert world.systemd.dropins.get(instances.unit(OLD_PORT), {}) == {}
    assert world.systemd.state_at_dropin[instances.unit(OLD_PORT)] == "inactive"


@pytest.mark.parametrize(("configured", "served"), [
    ("", "shop.wsgi:application"),  # the Procfile's web line names it
    ("shop.api:app", "shop.api:app"),  # app.wsgi wins
])
def test_the_procfiles_web_line_names_the_app_unless_app_wsgi_does(world: World, configured: str,
                                                                  served: str) -> None:
    (world.controller.releases.path(NEW) / "Procfile").write_text(
        "web: gunicorn --workers 3 --bind 0.0.0.0:$PORT shop.wsgi\n")
    config = world.controller.settings.in_effect
    world.controller.reload(replace(config, app=replace(config.app, wsgi=configured)))
    assert asyncio.run(world.deploy()).state == State.SUCCEEDED
    assert instances.read_env(world.paths.runtime, 8002)["BLUEGREEN_WSGI"] == served


@pytest.mark.parametrize(("procfile", "wsgi", "asgi", "served", "worker_class"), [
    ("web: uvicorn service.main:app --port $PORT\n", "", "", "service.main:app",
     instances.ASGI_WORKER_CLASS),
    ("web: gunicorn -k uvicorn.workers.UvicornWorker main:app\n", "", "", "main:app",
     instances.ASGI_WORKER_CLASS),
    ("web: gunicorn shop.wsgi\n", "", "service.main:app", "service.main:app",
     instances.ASGI_WORKER_CLASS),  # app.asgi wins
    ("web: uvicorn service.main:app\n", "shop.wsgi:application", "", "shop.wsgi:application",
     "sync"),  # app.wsgi wins
])
def test_an_asgi_app_runs_on_uvicorns_worker(world: World, procfile: str, wsgi: str, asgi: str,
                                             served: str, worker_class: str) -> None:
    (world.controller.releases.path(NEW) / "Procfile").write_text(procfile)
    config = world.controller.settings.in_effect
    world.controller.reload(replace(config, app=replace(config.app, wsgi=wsgi, asgi=asgi)))
    assert asyncio.run(world.deploy()).state == State.SUCCEEDED
    settings = instances.read_env(world.paths.runtime, 8002)
    assert (settings["BLUEGREEN_WSGI"], settings["BLUEGREEN_WORKER_CLASS"]) == (served, worker_class)


def fail_switch_back(world: World) -> None:
    world.healthy = False  # the watch sees it, and the switch back cannot start the old forwarder
    world.systemd.refuse_start.add(control.unit(OLD_PORT))


def fail_watch_status(world: World) -> None:
    world.systemd.unreadable.add(instances.unit(8002))


def fail_drain_sock_diag(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(port: int) -> int:
        raise OSError(105, "No buffer space available")
    monkeypatch.setattr(sockdiag, "served_connections", refuse)


@pytest.mark.parametrize("fault", ["switch-back-start", "watch-status", "drain-sock-diag"])
def test_a_failure_past_the_switch_reads_back_what_serves(world: World,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           fault: str) -> None:
    """The new forwarder carries the traffic: the controller must say so, and leave no other
    forwarder or instance behind (the next deploy would otherwise split the traffic)."""
    if fault == "switch-back-start":
        fail_switch_back(world)
    elif fault == "watch-status":
        fail_watch_status(world)
    else:
        fail_drain_sock_diag(world, monkeypatch)

    async def scenario() -> tuple[Deployment, Deployment]:
        record = await world.deploy()
        assert record.state == State.FAILED, record
        assert "b" * 12 + " serves on port 8002" in record.reason, record.reason
        assert world.controller.serving == Serving(8002, NEW)
        assert world.systemd.active("bluegreen-forward@*") == ["bluegreen-forward@8002.service"]
        assert world.systemd.active(instances.PATTERN) == ["bluegreen-app@8002.service"]
        # The next deploy starts from there: one forwarder again at its end.
        world.healthy = True
        world.systemd.unreadable.clear()
        monkeypatch.setattr(sockdiag, "served_connections", lambda port: 0)
        monkeypatch.setattr(ports, "pick", lambda *_: 8003)
        return record, await world.deploy(OLD)

    _, again = asyncio.run(scenario())
    assert again.state == State.SUCCEEDED, again
    assert world.systemd.active("bluegreen-forward@*") == ["bluegreen-forward@8003.service"]
    assert world.systemd.active(instances.PATTERN) == ["bluegreen-app@8003.service"]
    assert not world.controller.fatal.is_set()


def test_a_switch_back_that_works_keeps_the_old_release(world: World) -> None:
    world.healthy = False
    record = asyncio.run(world.deploy())
    assert (record.state, record.failed_step) == (State.SWITCHED_BACK, Step.WATCH)
    assert world.controller.serving == Serving(OLD_PORT, OLD)
    assert world.systemd.active("bluegreen-forward@*") == [control.unit(OLD_PORT)]


def test_a_background_task_that_fails_or_ends_stops_the_daemon(world: World) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        async def fails() -> None:
            raise RuntimeError("boom")

        async def ends() -> None:
            return None

        async def runs() -> None:
            await asyncio.sleep(3600)

        controller = world.controller
        controller.tasks.spawn(ends(), "one-shot", forever=False)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after_one_shot = controller.fatal.is_set()
        controller.tasks.spawn(fails(), "loop")
        await asyncio.wait_for(controller.fatal.wait(), 5)
        controller.fatal.clear()
        controller.tasks.spawn(ends(), "loop")
        await asyncio.wait_for(controller.fatal.wait(), 5)
        ended = controller.fatal.is_set()
        controller.fatal.clear()
        controller.tasks.spawn(runs(), "loop")
        await controller.stop()  # cancelled while stopping: nothing to report
        await asyncio.sleep(0)
        return after_one_shot, ended, controller.fatal.is_set()

    assert asyncio.run(scenario()) == (False, True, False)


def test_the_monitor_loop_dying_stops_the_daemon(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_: Any) -> health.Probe:
        raise ValueError("a bug in a probe")

    monkeypatch.setattr(health, "probe", broken)

    async def scenario() -> bool:
        world.controller.tasks.spawn(world.controller.monitor.run(), "health-monitor")
        await asyncio.wait_for(world.controller.fatal.wait(), 5)
        await world.controller.stop()
        return True

    assert asyncio.run(scenario())


def test_an_interrupted_deploy_of_a_pushed_head_is_retried_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = World(tmp_path, monkeypatch)
    blocked = asyncio.Event()

    async def hang(*_: Any) -> Serving:
        blocked.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def interrupted() -> str | None:
        monkeypatch.setattr(first.controller.deployer, "deploy", hang)
        head = await first.controller.refresher.poll()
        await blocked.wait()
        await first.controller.stop()  # the controller stops mid-deploy
        return head

    assert asyncio.run(interrupted()) == NEW
    assert History(first.paths.database).newest_of(NEW).state == State.INTERRUPTED  # type: ignore[union-attr]

    second = World(tmp_path, monkeypatch, systemd=first.systemd)

    async def restarted() -> tuple[str | None, State]:
        await started(second.controller)
        head = await second.controller.refresher.poll()
        task = second.controller._task
        assert task is not None
        await task
        record = second.controller.history.newest_of(NEW)
        assert record is not None
        again = await second.controller.refresher.poll()  # now it has an outcome: left alone
        await second.controller.stop()
        assert again is None
        return head, State(record.state)

    assert asyncio.run(restarted()) == (NEW, State.SUCCEEDED)


def test_a_failed_deploy_of_a_pushed_head_is_not_retried(world: World) -> None:
    world.systemd.refuse_start.add(instances.unit(8002))

    async def scenario() -> tuple[str | None, str | None]:
        head = await world.controller.refresher.poll()
        task = world.controller._task
        assert task is not None
        await task
        return head, await world.controller.refresher.poll()

    assert asyncio.run(scenario()) == (NEW, None)
    assert world.controller.history.newest_of(NEW).state == State.FAILED  # type: ignore[union-attr]


def test_recovery_tries_again_while_the_release_stays_unhealthy(world: World,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[int] = []
    real_deploy = world.controller.deployer.deploy

    async def first_fails(serving: Serving | None, config: Config, recorder: Recorder,
                          skip: str | None) -> Serving:
        attempts.append(recorder.record.id)
        if len(attempts) == 1:
            raise DeployFailed(Step.START, "bluegreen-app@8002.service failed to start")
        return await real_deploy(serving, config, recorder, skip)

    monkeypatch.setattr(world.controller.deployer, "deploy", first_fails)

    async def scenario() -> None:
        world.controller.monitor.healthy = False
        await world.controller.recovery.on_health_change(False, "3 failed checks in a row: HTTP 500")
        recovery = world.controller.recovery.task
        assert recovery is not None
        await asyncio.wait_for(recovery, 30)

    asyncio.run(scenario())
    records = [world.controller.history.get(i) for i in attempts]
    assert [(r.trigger, r.state) for r in records] == [(Trigger.RECOVERY, State.FAILED),
                                                      (Trigger.RECOVERY, State.SUCCEEDED)]
    assert world.controller.serving == Serving(8002, OLD)
    assert world.controller.monitor.healthy


def hold_stale_forwarder(world: World, release: str) -> asyncio.Event:
    """A newer deployment of ``release`` serves on 8002 beside OLD_PORT's forwarder, whose
    drain at start-up hangs until the event returned is set."""
    world.systemd.units[instances.unit(8002)] = "active"
    world.systemd.units[control.unit(8002)] = "active"
    write_instance_env(world.paths.runtime, 8002, release, 2)  # the newer deployment: it stays
    drained = asyncio.Event()
    stop_unit = world.systemd.stop_unit

    async def slow_stop(unit: str, **options: Any) -> None:
        if unit == control.unit(OLD_PORT):
            await drained.wait()
        await stop_unit(unit, **options)

    world.systemd.stop_unit = slow_stop  # type: ignore[method-assign]
    return drained


def test_start_returns_once_what_serves_is_adopted(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Draining a stale forwarder can take drain_timeout: it happens after READY, and no
    deployment starts meanwhile (a request waits SETTLE_WAIT for it, then is refused)."""
    monkeypatch.setattr(controller_module, "SETTLE_WAIT", 0.2)
    drained = hold_stale_forwarder(world, NEW)

    async def scenario() -> None:
        controller = world.controller
        await asyncio.wait_for(controller.start(), 5)
        assert controller.serving == Serving(8002, NEW)
        assert controller.state == "starting"
        with pytest.raises(Busy):
            await controller.request_deploy("", Trigger.DBUS)
        drained.set()
        while controller._settling:
            await asyncio.sleep(0.01)
        assert world.systemd.active("bluegreen-forward@*") == [control.unit(8002)]
        assert world.systemd.active(instances.PATTERN) == [instances.unit(8002)]
        assert controller.state == "serving"
        await controller.stop()

    asyncio.run(scenario())


def test_a_deploy_asked_for_during_the_start_up_clean_up_waits_for_it(world: World) -> None:
    """`systemctl restart bluegreen && bluegreenctl deploy`: the request comes while the
    controller still settles what it found; it waits for that, then deploys."""
    drained = hold_stale_forwarder(world, OLD)

    async def scenario() -> Deployment:
        controller = world.controller
        await controller.start()
        assert controller.state == "starting"
        asked = asyncio.create_task(world.deploy(NEW))
        await asyncio.sleep(0.1)
        assert not asked.done()
        assert controller.current is None and instances.unit(8003) not in world.systemd.units
        drained.set()
        record = await asyncio.wait_for(asked, 10)
        await controller.stop()
        return record

    record = asyncio.run(scenario())
    assert record.state == State.SUCCEEDED, record
    assert world.controller.serving is not None and world.controller.serving.release == NEW


def with_instances(world: World, count: int) -> None:
    """app.instances = count (World.patch picks instance ports in order from 8002)."""
    controller = world.controller
    settings = controller.settings
    settings.in_file = replace(settings.in_file, app=replace(settings.in_file.app, instances=count))


def test_a_deploy_starts_and_switches_in_every_instance(world: World,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with_instances(world, 2)
    record = asyncio.run(world.deploy())
    assert record.state == State.SUCCEEDED, record
    assert record.port == 8002
    assert world.controller.serving == Serving(8002, NEW, (8003,))
    assert world.systemd.active(instances.PATTERN) == [instances.unit(8002), instances.unit(8003)]
    assert world.systemd.active("bluegreen-forward@*") == [control.unit(8002),
                                                           control.unit(8003)]


def test_a_deploy_whose_second_instance_fails_stops_both(world: World,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with_instances(world, 2)
    world.systemd.refuse_start.add(instances.unit(8003))
    record = asyncio.run(world.deploy())
    assert record.state == State.FAILED, record
    assert world.controller.serving == Serving(OLD_PORT, OLD)
    assert world.systemd.active(instances.PATTERN) == [instances.unit(OLD_PORT)]
    assert world.systemd.active("bluegreen-forward@*") == [control.unit(OLD_PORT)]


def test_a_dead_instance_is_taken_out_and_put_back_once_healthy(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    with_instances(world, 2)

    async def scenario() -> None:
        await world.deploy()
        controller, systemd = world.controller, world.systemd
        systemd.units[instances.unit(8003)] = "activating"  # systemd restarts it
        for listener in systemd.on_unit_state:
            listener(instances.unit(8003), "deactivating")
        while control.unit(8003) in systemd.active("bluegreen-forward@*"):
            await asyncio.sleep(0.01)
        assert controller.pool.out() == [8003]
        assert controller.health() == (True, f"release {NEW[:12]} serves on ports 8002, 8003 "
                                       "(out until healthy again: port 8003)")
        # The last one that takes traffic stays, sick or not.
        await controller.pool.take_out(8002, "killed")
        assert systemd.active("bluegreen-forward@*") == [control.unit(8002)]
        # Restarted and healthy again: back on the public port (once its forwarder stopped).
        await controller.pool.settled()
        systemd.units[instances.unit(8003)] = "active"
        await controller.pool.probed(8003, health.Probe(True, "HTTP 200"))
        assert controller.pool.out() == []
        assert systemd.active("bluegreen-forward@*") == [control.unit(8002),
                                                         control.unit(8003)]
        await controller.stop()
        # Stopped (an app removed by a reload), it no longer hears of its instances' units.
        assert controller.recovery.on_unit_state not in systemd.on_unit_state
        assert controller.pool.members == {}

    asyncio.run(scenario())


def test_two_apps_never_touch_each_others_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default app serves on OLD_PORT; a second app starts beside it, deploys, restarts
    (its controller reconciles), and the default app deploys: each one's reconciliation and
    deploys stop only its own units."""
    default = World(tmp_path, monkeypatch)
    default.systemd.units[workers.unit(OLD_PORT, "clock")] = "active"
    staging = World(tmp_path, monkeypatch, systemd=default.systemd, app="staging", public=5100)
    staging.controller.releases.path(NEW).mkdir(parents=True)

    async def scenario() -> None:
        await started(staging.controller)  # nothing of its own serves: it deploys the branch
        assert default.systemd.active(instances.PATTERN)[0] == instances.unit(OLD_PORT)
        assert default.systemd.active("bluegreen-forward@*")[0] == control.unit(OLD_PORT)
        assert default.systemd.active("bluegreen-worker@*") == [workers.unit(OLD_PORT, "clock")]
        while staging.controller.state != "serving":
            await asyncio.sleep(0.01)
        assert staging.controller.serving == Serving(8002, NEW)
        assert instances.app_named(instances.read_env(staging.paths.runtime, 8002)) == "staging"
        assert control.app_of(staging.paths.runtime, 8002) == "staging"
        await staging.controller.stop()

        restarted = World(tmp_path, monkeypatch, systemd=default.systemd, app="staging", public=5100)
        await started(restarted.controller)
        assert restarted.controller.serving == Serving(8002, NEW)
        record = await default.deploy(NEW)
        assert record.state == State.SUCCEEDED, record.reason
        assert default.controller.serving == Serving(8003, NEW)
        assert default.systemd.active(instances.PATTERN) == [instances.unit(8002), instances.unit(8003)]
        assert default.systemd.active("bluegreen-forward@*") == [control.unit(8002), control.unit(8003)]
        assert default.systemd.active("bluegreen-worker@*") == []
        await restarted.controller.remove()  # its file is gone: its units stop, the other's stay
        assert default.systemd.active(instances.PATTERN) == [instances.unit(8003)]
        assert default.systemd.active("bluegreen-forward@*") == [control.unit(8003)]

    asyncio.run(scenario())


def test_a_restarted_controller_adopts_every_instance_of_the_serving_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = World(tmp_path, monkeypatch)
    with_instances(first, 2)
    asyncio.run(first.deploy())
    first.systemd.units[control.unit(8003)] = "inactive"  # taken out when the controller died
    second = World(tmp_path, monkeypatch, systemd=first.systemd)

    async def restarted() -> None:
        controller = second.controller
        await started(controller)
        assert controller.serving == Serving(8002, NEW, (8003,))
        assert controller.pool.out() == [8003]
        await controller.stop()

    asyncio.run(restarted())
    assert first.systemd.active(instances.PATTERN) == [instances.unit(8002), instances.unit(8003)]


def test_a_reload_adds_and_removes_apps_or_changes_nothing(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "ensure_migrate_req", lambda: False)
    apps_dir = tmp_path / "apps"
    apps_dir.mkdir()
    (tmp_path / "bluegreen.toml").write_text("")
    paths = Paths(state=tmp_path / "state", runtime=tmp_path / "run", config=tmp_path / "bluegreen.toml")
    manager = AppManager(FakeSystemd(), paths, apps_dir)  # type: ignore[arg-type]

    async def scenario() -> None:
        for config in manager.load().values():
            manager.add(config)
        await manager.start()
        (apps_dir / "staging.toml").write_text("[ports]\npublic = 5100\n")
        assert await manager.reload() == [("app staging", "added")]
        assert logsetup.APP.get() == "default"  # what follows is not about staging
        assert manager.controllers["staging"].paths.state == tmp_path / "state" / "apps" / "staging"
        (apps_dir / "beta.toml").write_text("[ports]\npublic = 5100\n")
        with pytest.raises(ConfigError, match=r"staging\.toml:2: ports\.public: 5100 is already the "
                           r"public port of the app beta"):
            await manager.reload()
        assert list(manager.controllers) == ["default", "staging"]
        (apps_dir / "beta.toml").unlink()
        (apps_dir / "staging.toml").write_text("[ports]\npublic = 5200\n")
        assert await manager.reload() == [("staging: ports.public", "at the next deploy")]
        assert logsetup.APP.get() == "default"  # staging's reload labelled its lines only
        (apps_dir / "staging.toml").unlink()
        changes = await manager.reload()
        assert changes == [("app staging", "removed: its units are stopped, its data kept")]
        assert list(manager.controllers) == ["default"]
        await manager.stop()

    asyncio.run(scenario())


def test_a_second_forwarder_that_fails_to_start_leaves_only_the_old_release_forwarded(
        world: World) -> None:
    with_instances(world, 2)
    world.systemd.refuse_start.add(control.unit(8003))
    record = asyncio.run(world.deploy())
    assert (record.state, record.failed_step) == (State.FAILED, Step.SWITCH), record
    assert world.systemd.active("bluegreen-forward@*") == [control.unit(OLD_PORT)]
    assert world.systemd.active(instances.PATTERN) == [instances.unit(OLD_PORT)]
    assert world.controller.serving == Serving(OLD_PORT, OLD)


def test_a_reload_refuses_a_public_port_another_app_still_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default app serves on 5000; its file moves it to 6000, which applies at its next
    deploy, and a new app's file takes 5000 in the same reload: that app would join the
    listeners that serve the default app."""
    default = World(tmp_path, monkeypatch)
    config_file = tmp_path / "bluegreen.toml"
    config_file.write_text('[repository]\nurl = "/srv/app.git"\nwatch = false\n'
                           "[ports]\npublic = 6000\n")
    apps_dir = tmp_path / "apps"
    apps_dir.mkdir()
    (apps_dir / "beta.toml").write_text("[ports]\npublic = 5000\n")
    manager = AppManager(default.systemd, replace(default.paths, config=config_file),  # type: ignore[arg-type]
                         apps_dir)
    manager.controllers["default"] = default.controller

    with pytest.raises(ConfigError) as error:
        asyncio.run(manager.reload())
    message = str(error.value)
    assert message.startswith(f"{apps_dir / 'beta.toml'}:2: ports.public: "), message
    assert "the app beta" in message and "the app default" in message, message
    assert list(manager.controllers) == ["default"]
    assert default.controller.settings.in_file.ports.public == 5000  # nothing changed
    assert default.controller.settings.in_effect.ports.public == 5000


def test_a_deploy_onto_a_public_port_another_app_serves_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = World(tmp_path, monkeypatch)
    manager = AppManager(default.systemd, default.paths, tmp_path / "apps")  # type: ignore[arg-type]
    manager.controllers["default"] = default.controller
    beta_config = replace(default.controller.settings.in_file, app_name="beta")  # public port 5000 too
    beta = manager.add(beta_config)
    World.patch(default, monkeypatch)  # the stand-ins for git, health and the forwarders
    monkeypatch.setattr(beta.repository, "resolve", default.controller.repository.resolve)
    monkeypatch.setattr(beta.deployer.preparer, "verifier",
                        default.controller.deployer.preparer.verifier)
    beta.releases.path(NEW).mkdir(parents=True)

    async def scenario() -> Deployment:
        record = await beta.request_deploy(NEW, Trigger.DBUS)
        assert beta._task is not None
        await beta._task
        return beta.history.get(record.id)

    record = asyncio.run(scenario())
    assert (record.state, record.failed_step) == (State.FAILED, Step.SWITCH), record
    assert "the app default" in record.reason and "the app beta" in record.reason, record.reason
    assert default.systemd.active("bluegreen-forward@*") == [control.unit(OLD_PORT)]
    assert default.systemd.active(instances.PATTERN) == [instances.unit(OLD_PORT)]


@pytest.mark.parametrize("moment", ["old-forwarder-starting", "new-forwarders-draining"])
def test_a_controller_killed_while_switching_back_keeps_the_old_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """The new release turned unhealthy in its watch, and the controller dies during the
    switch-back: while the old forwarder's start job runs (it counts as a target already), or,
    with two instances, while the first new forwarder drains and the second still listens.
    Both releases then have a forwarder target, the new deployment the newer: the restarted
    controller must finish the switch-back, not adopt the release it was leaving."""
    first = World(tmp_path, monkeypatch)
    old = first.controller.history.begin("main", Trigger.CLI, commit=OLD)  # deployment 1: OLD's
    first.controller.history.save(finished(old, State.SUCCEEDED))
    first.healthy = False
    start, drain_stop = control.start, control.drain_stop
    killed_here = asyncio.Event()

    async def slow_start(systemd: FakeSystemd, run_dir: Path, port: int, *args: Any,
                         **kwargs: Any) -> None:
        if port == OLD_PORT:  # the switch-back's
            systemd.units[control.unit(port)] = "activating"
            killed_here.set()
            await asyncio.Event().wait()
        await start(systemd, run_dir, port, *args, **kwargs)  # type: ignore[arg-type]

    async def slow_drain(systemd: FakeSystemd, run_dir: Path, port: int, timeout: float) -> None:
        if port == 8002 and first.controller.current and first.controller.current.steps[-1].step \
                == Step.SWITCH_BACK:
            systemd.units[control.unit(port)] = "deactivating"  # its stop job drains
            killed_here.set()
            await asyncio.Event().wait()
        await drain_stop(systemd, run_dir, port, timeout)  # type: ignore[arg-type]

    if moment == "old-forwarder-starting":
        monkeypatch.setattr(control, "start", slow_start)
    else:
        with_instances(first, 2)
        monkeypatch.setattr(control, "drain_stop", slow_drain)

    async def until_killed() -> int:
        record = await first.controller.request_deploy(NEW, Trigger.DBUS)
        await killed_here.wait()
        return record.id

    dead = asyncio.new_event_loop()  # the controller's loop: it never runs again (SIGKILL)
    deployment_id = dead.run_until_complete(until_killed())
    monkeypatch.setattr(control, "drain_stop", drain_stop)
    second = World(tmp_path, monkeypatch, systemd=first.systemd)  # its stand-in for start too

    async def restarted() -> None:
        controller = second.controller
        await controller.start()
        assert controller.serving == Serving(OLD_PORT, OLD)
        while controller._settling:
            await asyncio.sleep(0.01)
        assert controller.history.get(deployment_id).state == State.INTERRUPTED
        await controller.stop()

    asyncio.run(restarted())
    assert first.systemd.active("bluegreen-forward@*") == [control.unit(OLD_PORT)]
    assert first.systemd.active(instances.PATTERN) == [instances.unit(OLD_PORT)]
    pending = asyncio.all_tasks(dead)  # the dead controller's: only so that none is left pending
    for task in pending:
        task.cancel()
    dead.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    dead.close()


def test_a_switch_back_flags_every_new_instance_before_any_of_their_forwarders_drains(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forwarder's drain steers new connections away from the instances whose drain flag is
    up (forwarders/hook.py): one not flagged yet would take new connections while the one before
    it drains, for as long as that takes."""
    config = world.controller.settings.in_effect
    world.controller.reload(replace(config, app=replace(config.app, instances=2)))
    world.healthy = False  # the watch fails: back to the old release
    flagged: list[list[int]] = []
    drain_stop = control.drain_stop

    async def drain_stop_seen(systemd: Any, run_dir: Path, port: int, timeout: float) -> None:
        if port != OLD_PORT:
            flagged.append([new for new in (8002, 8003) if drainflag.path(run_dir, new).exists()])
        await drain_stop(systemd, run_dir, port, timeout)

    monkeypatch.setattr(control, "drain_stop", drain_stop_seen)
    record = asyncio.run(world.deploy())
    assert record.state == State.SWITCHED_BACK, record
    assert flagged == [[8002, 8003], [8002, 8003]]

def test_a_failed_deploy_prunes_environments_too(world: World) -> None:
    """Deploys that keep failing (each with other dependencies) must not pile environments up."""
    unused = world.controller.catalog.environments.path("0" * 32)
    (unused / "bin").mkdir(parents=True)
    (unused / ".bluegreen-ready").write_text("requirements.txt\n")
    world.systemd.refuse_start.add(instances.unit(8002))
    record = asyncio.run(world.deploy())
    assert (record.state, record.failed_step) == (State.FAILED, Step.START), record
    assert world.controller.catalog.environments.on_disk() == []


class StepLog:
    """An observer of the controller: the steps it is told of, and the outcomes."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, int]] = []  # step, its port, the record's port
        self.outcomes: list[tuple[str, str]] = []

    def step(self, deployment: Deployment, step: Step, port: int) -> None:
        self.steps.append((str(step), port, deployment.port))

    def finished(self, deployment: Deployment) -> None:
        self.outcomes.append((deployment.state, deployment.failed_step))

    def changed(self) -> None:
        pass


def test_observers_are_told_of_each_step_once_with_the_port_it_works_on(world: World) -> None:
    seen = StepLog()
    world.controller.observers.append(seen)
    record = asyncio.run(world.deploy())
    assert seen.steps == [("materialize", 0, 0), ("verify", 0, 0), ("start", 8002, 8002),
                          ("health", 8002, 8002), ("switch", 8002, 8002), ("drain", OLD_PORT, 8002),
                          ("watch", 8002, 8002), ("stop-old", OLD_PORT, 8002)]
    assert seen.outcomes == [(State.SUCCEEDED, "")]
    assert [timing.step for timing in record.steps] == [
        "resolve", "materialize", "verify", "start", "health", "switch", "drain", "watch",
        "stop-old"]


def test_a_failed_step_is_the_last_one_observers_were_told_of(world: World) -> None:
    world.systemd.refuse_start.add(instances.unit(8002))
    seen = StepLog()
    world.controller.observers.append(seen)
    record = asyncio.run(world.deploy())
    assert seen.steps[-1] == ("start", 8002, 8002)
    assert seen.outcomes == [(State.FAILED, "start")]
    assert (record.port, record.steps[-1].step) == (8002, "start")
