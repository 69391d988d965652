"""A real ASGI service (examples/fastapi-service: FastAPI on uvicorn, a lifespan, a websocket)
deployed with ``app.asgi``, under load.

Five deploys under three kinds of clients at once: a connection per request (with a slow
request always in flight), keep-alive clients (tests/keepalive.py) and websocket clients
(tests/wsclients.py, which reconnect when the server closes). No request fails; the keep-alive
clients are on the new release within 1 s of the drain step (when the old instance gets its
drain flag); every websocket of the old release gets a close frame
(1012) promptly after the switch, and its client is on the new release right after.

The container has no network: pip installs from the wheelhouse built on the test host
(tests/wheelhouse.py).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from typing import Any

import pytest

from bluegreen import instances
from tests import wheelhouse
from tests.integration.forwarder_suite import Clients, step_time
from tests.integration.helpers import (
    App,
    Load,
    call,
    configure,
    deploy_new_release,
    git,
    http,
    properties,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import ROOT, Sandbox

pytestmark = pytest.mark.integration

SERVICE = ROOT / "examples/fastapi-service"
DEPLOYS = 5
DRAIN_TIMEOUT = 10.0
STARTUP_SECONDS = 2.0  # the service's lifespan startup
HEALTH_ROUTE = ('@app.get("/health")\nasync def health(request: Request) -> dict[str, object]:\n'
                '    return {"ok": True, **identity(request)}\n')
INDEX_ROUTE = ('@app.get("/")\nasync def index(request: Request) -> dict[str, object]:\n'
               '    return identity(request)\n')
MAX_LAG = 1.0  # keep-alive and websocket clients on the new release within it
CLOSE_CODES = (1001, 1012)


def config(**health: float) -> str:
    """The module's bluegreen.toml: no app.health_path, as a new user's; more [health] keys."""
    return (settings(1, workers=2, top={"drain_timeout": DRAIN_TIMEOUT}, app={"asgi": "main:app"},
                     release={"timeout": 300}, health=health)
            + f'[app.environment]\nSTARTUP_SECONDS = "{STARTUP_SECONDS:g}"\n')


class Service(App):
    def create(self) -> str:
        shutil.copytree(SERVICE, self.work, ignore=shutil.ignore_patterns("__pycache__"))
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "add", ".")
        git(self.work, "commit", "-q", "-m", "fastapi-service")
        subprocess.run(["git", "clone", "-q", "--bare", str(self.work), str(self.bare)], check=True)
        return git(self.work, "rev-parse", "HEAD")


class Websockets(Load):
    """tests/wsclients.py against the public port while the block runs."""

    SCRIPT = "tests/wsclients.py"


@pytest.fixture(scope="module")
def service(box: Sandbox) -> Service:
    box.use_wheelhouse(wheelhouse.build())
    repository = Service(box)
    repository.create()
    configure(box, config())
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    wait_serving(box, timeout=300)
    return repository


def test_the_service_runs_on_uvicorns_worker_once_its_lifespan_started(box: Sandbox,
                                                                         service: Service) -> None:
    port = properties(box)["ActivePort"]
    env = box.run("cat", f"/run/bluegreen/instances/{port}.env").stdout
    assert f'BLUEGREEN_WORKER_CLASS="{instances.ASGI_WORKER_CLASS}"' in env, env
    assert 'BLUEGREEN_WSGI="main:app"' in env, env
    index = public(box)
    assert index["version"] == "1" and index["started"], index  # the lifespan ran
    record = call(box, "ListDeployments", "u", "1")[0]
    assert record["state"] == "succeeded", record
    # Healthy only once the lifespan startup is over: no request reached the app before.
    assert step_time(record, "switch") - step_time(record, "start") >= STARTUP_SECONDS, record
    journal = box.journal("-u", f"bluegreen-app@{port}.service")
    assert "Application startup complete" in journal and "Traceback" not in journal, journal[-3000:]


def websocket_moves(sessions: list[list[Any]], drains: dict[str, float]) -> list[str]:
    """What went wrong with the websocket sessions, each a string (none: nothing)."""
    problems = []
    for number in sorted({session[5] for session in sessions}):
        mine = [s for s in sessions if s[5] == number]
        *ended, last = mine
        if last[3] != "stopped":
            problems.append(f"client {number}: its last session ended {last[3]}")
        for version, opened, closed, how, _echoed, _ in ended:
            if how not in CLOSE_CODES:
                problems.append(f"client {number}: a session of release {version!r} opened at "
                                f"{opened:.3f} ended {how} at {closed:.3f}")
        versions = [s[0] for s in mine if s[0]]
        if versions != sorted(versions, key=int):
            problems.append(f"client {number} went back to an older release: {versions}")
        for version, drain in drains.items():
            old = str(int(version) - 1)
            closed = [s[2] for s in mine if s[0] == old]
            reached = [s[1] for s in mine if s[0] == version]
            if not closed or not reached:
                problems.append(f"client {number}: no session on release {old} or {version}")
                continue
            if max(closed) - drain > MAX_LAG:
                problems.append(f"client {number}: its websocket on release {old} was closed "
                                f"{max(closed) - drain:.3f} s after the drain step")
            if min(reached) - max(closed) > MAX_LAG:
                problems.append(f"client {number}: on release {version} "
                                f"{min(reached) - max(closed):.3f} s after the close")
    return problems


def test_five_deploys_lose_no_request_and_move_every_client(box: Sandbox, service: Service) -> None:
    first = service.version + 1
    records = []
    load = Load(box, "--fast", "2", "--slow", "1", "--slow-seconds", "2")
    clients = Clients(box, "--busy", "4", "--thinkers", "0")
    sockets = Websockets(box, "--clients", "4", "--interval", "0.1")
    with contextlib.ExitStack() as stack:
        for block in (load, clients, sockets):
            stack.enter_context(block)
        for number in range(DEPLOYS):
            records.append(deploy_new_release(box, service, f"Release {first + number}"))

    versions = {str(first + number): record for number, record in enumerate(records)}
    drains = {version: step_time(record, "drain") for version, record in versions.items()}
    requests, keepalive, sessions = load.report, clients.report, sockets.report["sessions"]
    print(f"\nper request: {requests['requests']} requests, {requests['failed']} failed, "
          f"slow requests {[s['outcome'] for s in requests['slow']]}; keep-alive: "
          f"{keepalive['requests']} requests, {keepalive['failed']} failed, "
          f"{keepalive['connection_close_responses']} responses with Connection: close; "
          f"websockets: {len(sessions)} sessions, "
          f"{sum(1 for s in sessions if not s[0])} closed before their hello")
    busy = [client for client in keepalive["clients"] if client["kind"] == "busy"]
    lags = []
    for version, record in versions.items():
        moved = [[start for seen, start, _end, _count in client["segments"] if seen == version]
                 for client in busy]
        assert all(moved), f"a keep-alive client never reached release {version}"
        # From the drain step, when the old instance got its drain flag.
        lags.append(max(starts[0] - drains[version] for starts in moved))
        old = str(int(version) - 1)
        closes = [s[2] - drains[version] for s in sessions if s[0] == old and s[3] in CLOSE_CODES]
        drained = step_time(record, "watch") - drains[version]
        print(f"release {version}: keep-alive clients moved within {lags[-1]:.3f} s, websockets of "
              f"release {old} closed {min(closes, default=-1):.3f}-{max(closes, default=-1):.3f} s "
              f"after the drain step, drain took {drained:.2f} s")
        # Nothing held the old instance: no websocket waited for drain_timeout.
        assert drained < DRAIN_TIMEOUT - 1, record

    assert requests["failed"] == 0, (requests["failures_by_kind"], requests["failures"][:10])
    assert all(slow["outcome"] == "ok" for slow in requests["slow"]), requests["slow"]
    assert requests["requests"] > 100 and len(requests["slow"]) >= DEPLOYS
    assert keepalive["failed"] == 0, (keepalive["failures_by_kind"], keepalive["failures"][:10])
    assert max(lags) <= MAX_LAG, [f"{lag:.3f}" for lag in lags]
    problems = websocket_moves(sessions, drains)
    assert not problems, problems[:20]
    assert public(box)["version"] == str(service.version)


def test_a_release_that_does_not_pin_uvicorn_fails_at_verify(box: Sandbox, service: Service) -> None:
    serving = properties(box)["ActiveRelease"]
    requirements = (service.work / "requirements.txt").read_text()
    unpinned = "".join(line for line in requirements.splitlines(keepends=True)
                       if not line.startswith(("uvicorn", "websockets", "click", "h11")))
    sha = service.commit("Without uvicorn", {"requirements.txt": unpinned})
    record = wait_deployment(box, call(box, "Deploy", "s", ""), timeout=300)
    assert (record["commit"], record["state"], record["failed_step"]) == (sha, "failed", "verify"), record
    assert "do not pin uvicorn" in record["reason"], record["reason"]
    assert properties(box)["ActiveRelease"] == serving
    assert http(box, "GET", "/", port=5000).status == 200


def test_a_release_whose_lifespan_startup_fails_never_serves(box: Sandbox, service: Service) -> None:
    serving = properties(box)["ActiveRelease"]
    git(service.work, "checkout", "-q", serving, "--", ".")
    source = (service.work / "main.py").read_text()
    startup = "    await asyncio.sleep(STARTUP_SECONDS)\n"
    assert startup in source
    sha = service.commit("A startup that fails", {"main.py": source.replace(
        startup, startup + '    raise RuntimeError("no database")\n')})
    record = wait_deployment(box, call(box, "Deploy", "s", ""), timeout=300)
    assert (record["commit"], record["state"], record["failed_step"]) == (sha, "failed", "health"), record
    # Failed as its instance died, not at health.deadline (60 s): gunicorn may exit 1 when
    # every worker fails to boot, and systemd restarts it (again and again, never answering).
    assert record["reason"].startswith("the instance stopped: "), record["reason"]
    checked = float(record["finished_at"]) - step_time(record, "health")
    assert checked < 40, (checked, record["reason"], box.journal(
        "-u", f"bluegreen-app@{record['port']}.service", "-o", "short-precise")[-4000:])
    assert properties(box)["ActiveRelease"] == serving
    assert public(box)["release"] == serving


def serving_source(box: Sandbox, service: Service) -> str:
    """main.py of the serving release, its tree checked out in the work tree."""
    git(service.work, "checkout", "-q", properties(box)["ActiveRelease"], "--", ".")
    return (service.work / "main.py").read_text()


def test_a_release_without_a_health_route_is_checked_on_its_root(box: Sandbox,
                                                                 service: Service) -> None:
    # As most published apps: no /health, and no app.health_path in bluegreen.toml.
    source = serving_source(box, service)
    assert HEALTH_ROUTE in source
    sha = service.commit("No /health", {"main.py": source.replace(HEALTH_ROUTE, "")})
    record = wait_deployment(box, call(box, "Deploy", "s", ""), timeout=300)
    assert (record["commit"], record["state"]) == (sha, "succeeded"), record
    assert "its health is checked on /" in record["reason"], record
    told = box.journal(f"DEPLOYMENT_ID={record['id']}", "-o", "cat")
    assert told.count("its health is checked on /") == 1, told[-3000:]
    assert http(box, "GET", "/health", port=5000).status == 404
    # The health monitor checks it the same way: ten checks on, no recovery, nothing unhealthy.
    time.sleep(2.0)
    assert properties(box)["ActiveRelease"] == sha
    assert call(box, "ListDeployments", "u", "1")[0]["id"] == record["id"]
    assert "unhealthy" not in box.journal("-u", "bluegreen.service", "--since", "-3s", "-o", "cat")


def test_a_release_without_health_whose_root_fails_is_refused_at_health(box: Sandbox,
                                                                      service: Service) -> None:
    serving = properties(box)["ActiveRelease"]
    source = serving_source(box, service)
    assert INDEX_ROUTE in source and HEALTH_ROUTE not in source
    failing = INDEX_ROUTE.replace("    return identity(request)\n",
                                  '    raise RuntimeError("no database")\n')
    configure(box, config(deadline=6))  # a 500 is answered at once: no need to wait a minute
    box.run("systemctl", "reload", "bluegreen.service")
    try:
        sha = service.commit("/ fails", {"main.py": source.replace(INDEX_ROUTE, failing)})
        record = wait_deployment(box, call(box, "Deploy", "s", ""), timeout=300)
    finally:
        configure(box, config())
        box.run("systemctl", "reload", "bluegreen.service")
    assert (record["commit"], record["state"], record["failed_step"]) == (sha, "failed", "health"), record
    assert "HTTP 500 from /" in record["reason"] and "app.health_path" in record["reason"], record
    assert properties(box)["ActiveRelease"] == serving
    assert public(box)["release"] == serving
