"""Several apps on one host: production (bluegreen.toml) and staging (apps/staging.toml), each
from its own repository on its own public port. Whatever staging goes through (deploys,
rollbacks, a failing release, a killed instance, a controller restart in the middle of its
deploy), production keeps its release and fails no request. Neither app's processes (instances,
workers, release phases) can read the other's secrets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.helpers import (
    MANAGER,
    SCRIPTED_APP,
    App,
    Load,
    busctl,
    configure,
    git,
    http,
    kill_controller,
    settings,
    unwrap,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

STAGING_PORT = 5100
STAGING_FILE = "/etc/bluegreen/apps/staging.toml"
STAGING_CONFIG = f"""\
post_switch_watch = 1
[repository]
url = "/srv/staging.git"
watch = false
[ports]
public = {STAGING_PORT}
[health]
interval = 0.2
unhealthy_threshold = 3
"""
# What each app's process sees of its environment: its secrets and its data directory; and
# where a value (another app's secret) could be read from: its credentials, the secrets
# directory, every credentials directory on the host, other processes' environments.
ENV_ROUTE = '''

@app.get("/env/<name>")
def environment(name):
    return jsonify(value=os.environ.get(name))


@app.get("/find/<value>")
def find(value):
    import glob
    places = [os.environ.get("CREDENTIALS_DIRECTORY", "/nonexistent") + "/*",
              "/etc/bluegreen/secrets/*", "/etc/bluegreen/secrets/*/*", "/run/credentials/*/*",
              "/proc/[0-9]*/environ", "/proc/[0-9]*/root/run/credentials/*/*"]
    found = []
    for path in sorted({p for place in places for p in glob.glob(place)}):
        try:
            with open(path, "rb") as f:
                if value.encode() in f.read():
                    found.append(path)
        except OSError:
            pass
    return jsonify(found=found)
'''

# Where a process of the app's user could find another app's secret: the environment and the
# credentials of any process it may look into, the secrets directory. (The value is spelled in
# two parts: a worker's command is in its own environment.)
SEARCH = ('p=production; found=$(grep -l -a -r -s "$p-token" /proc/[0-9]*/environ '
          '/proc/[0-9]*/root/run/credentials/ /etc/bluegreen/secrets/)')
# Production's release phase lasts until the test lets it end; staging's, meanwhile, looks for
# production's secret (and fails if it finds it), and so does staging's worker.
PRODUCTION_PROCFILE = ('release: while [ ! -e "$BLUEGREEN_DATA_DIR/release-may-end" ]; do sleep 0.1; '
                       'done; [ "$TOKEN" = production-token ]\n')
STAGING_PROCFILE = (f'release: [ "$TOKEN" = staging-token ] || exit 2; {SEARCH}; '
                    '[ -z "$found" ] || { echo "found production\'s secret: $found"; exit 1; }\n'
                    f'seeker: {SEARCH}; echo "$found" > "$BLUEGREEN_DATA_DIR/seeker-found"; '
                    'echo "$TOKEN" > "$BLUEGREEN_DATA_DIR/seeker-token"; exec sleep 1000\n')


def path_of(app: str) -> str:
    return MANAGER[1] if app == "default" else f"{MANAGER[1]}/app/{app}"


def call_app(box: Sandbox, app: str, member: str, signature: str = "", *args: str) -> Any:
    out = busctl(box, "call", MANAGER[0], path_of(app), MANAGER[2], member,
                 *([signature, *args] if signature else [])).stdout
    if not out.strip():
        return None
    data = unwrap(json.loads(out))
    return data[0] if len(data) == 1 else data


def props(box: Sandbox, app: str) -> dict[str, Any]:
    out = busctl(box, "call", MANAGER[0], path_of(app), "org.freedesktop.DBus.Properties",
                 "GetAll", "s", MANAGER[2]).stdout
    result: dict[str, Any] = unwrap(json.loads(out))[0]
    return result


def wait_state(box: Sandbox, app: str, state: str = "serving", timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = busctl(box, "call", MANAGER[0], path_of(app), "org.freedesktop.DBus.Properties",
                        "GetAll", "s", MANAGER[2], check=False)
        if result.returncode == 0:
            found = unwrap(json.loads(result.stdout))[0]
            if found["State"] == state:
                return found
        time.sleep(0.1)
    raise AssertionError(f"{app} not {state} after {timeout} s: {found}\n"
                         f"{box.journal('-u', 'bluegreen*', '-n', '80')}")


def deploy(box: Sandbox, app: str, ref: str = "", rollback: bool = False) -> dict[str, Any]:
    """Deploy (or roll back) and wait for the outcome; return the record."""
    deployment_id = call_app(box, app, "Rollback" if rollback else "Deploy", "s", ref)
    return wait_done(box, app, deployment_id)


def wait_done(box: Sandbox, app: str, deployment_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record: dict[str, Any] = call_app(box, app, "GetDeployment", "s", deployment_id)
        if record["state"] != "running":
            return record
        time.sleep(0.1)
    raise AssertionError(f"{app} deployment {deployment_id} still running after {timeout} s")


def get(box: Sandbox, port: int, path: str = "/") -> dict[str, Any]:
    response = http(box, "GET", path, port=port)
    assert response.status == 200, response
    result: dict[str, Any] = response.body
    return result


def instances_of(box: Sandbox, app: str) -> list[int]:
    return sorted(port for port, state, _release in call_app(box, app, "ListInstances")
                  if state == "active")


@pytest.fixture(scope="module")
def repos(box: Sandbox) -> dict[str, App]:
    production = App(box)
    production.create()
    staging = App(box)
    staging.work, staging.bare = box.path("/srv/staging-work"), box.path("/srv/staging.git")
    staging.create()
    for app, version in ((production, "1"), (staging, "staging-1")):  # two different commits
        app.commit("Show the environment",
                   {"app.py": (app.work / "app.py").read_text() + ENV_ROUTE, "VERSION": f"{version}\n"})
    configure(box, settings(1))
    box.write(STAGING_FILE, STAGING_CONFIG)
    box.run("install", "-d", "-m", "700", "/etc/bluegreen/secrets/staging")
    box.write("/etc/bluegreen/secrets/TOKEN", "production-token\n")
    box.write("/etc/bluegreen/secrets/staging/TOKEN", "staging-token\n")
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    wait_state(box, "default")
    wait_state(box, "staging")
    return {"production": production, "staging": staging}


@pytest.fixture()
def production_untouched(box: Sandbox, repos: dict[str, App]) -> Iterator[None]:
    """Production's release, port and instances stay as they are, and under load on its port
    (staging's port loaded too) no request fails."""
    before = props(box, "default")
    units = instances_of(box, "default")
    with Load(box, "--port", "5000", "--fast", "2", "--slow", "1") as production, \
            Load(box, "--port", str(STAGING_PORT), "--fast", "2", "--slow", "0") as staging:
        yield
    after = props(box, "default")
    report = production.report
    print(f"\nproduction: {report['requests']} requests, {report['failed']} failed; "
          f"staging: {staging.report['requests']} requests, {staging.report['failed']} failed "
          f"({staging.report['failures_by_kind']})")
    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    assert report["requests"] > 100
    assert len(report["versions"]) == 1, report["versions"]  # no production deploy meanwhile
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert instances_of(box, "default") == units


def test_two_apps_serve_side_by_side_each_with_its_own_secrets_and_data(
        box: Sandbox, repos: dict[str, App]) -> None:
    production, staging = props(box, "default"), props(box, "staging")
    assert production["ActiveRelease"] == repos["production"].head()
    assert staging["ActiveRelease"] == repos["staging"].head()
    assert (production["PublicPort"], staging["PublicPort"]) == (5000, STAGING_PORT)
    assert get(box, 5000)["release"] == repos["production"].head()
    assert get(box, STAGING_PORT)["release"] == repos["staging"].head()
    assert get(box, 5000, "/env/TOKEN")["value"] == "production-token"
    assert get(box, 5000, "/env/staging_TOKEN")["value"] is None
    assert get(box, STAGING_PORT, "/env/TOKEN")["value"] == "staging-token"
    # Each app's processes can read its own secret, and no other app's, from anywhere.
    for port, own, other in ((5000, "production-token", "staging-token"),
                             (STAGING_PORT, "staging-token", "production-token")):
        assert get(box, port, f"/find/{own}")["found"], own
        assert get(box, port, f"/find/{other}")["found"] == [], (port, other)
    assert get(box, 5000, "/env/BLUEGREEN_DATA_DIR")["value"] == "/var/lib/bluegreen/data"
    assert get(box, STAGING_PORT, "/env/BLUEGREEN_DATA_DIR")["value"] == "/var/lib/bluegreen/app-data/staging"
    assert box.path("/var/lib/bluegreen/apps/staging/bluegreen.db").exists()
    assert box.path(f"/var/lib/bluegreen/apps/staging/releases/{repos['staging'].head()}").is_dir()
    assert not box.path(f"/var/lib/bluegreen/releases/{repos['staging'].head()}").exists()

    listed = box.run("bluegreenctl", "apps").stdout
    assert "default" in listed and "staging" in listed, listed
    status = box.run("bluegreenctl", "-a", "staging", "status").stdout
    assert f"via port {STAGING_PORT}" in status, status
    missing = box.run("bluegreenctl", "-a", "nope", "status", check=False)
    assert missing.returncode == 4, missing
    over_http = http(box, "GET", "/apps/staging/status")
    assert over_http.status == 200 and over_http.body["public_port"] == STAGING_PORT, over_http
    assert http(box, "GET", "/apps/nope/status").status == 404


def test_staging_deploys_rollbacks_and_breakage_leave_production_alone(
        box: Sandbox, repos: dict[str, App], production_untouched: None) -> None:
    staging = repos["staging"]
    first = staging.head()
    second = staging.commit("Staging release 2")
    assert deploy(box, "staging")["state"] == "succeeded"
    assert props(box, "staging")["ActiveRelease"] == second
    assert deploy(box, "staging", rollback=True)["state"] == "succeeded"
    assert props(box, "staging")["ActiveRelease"] == first

    broken = staging.commit("Staging release that never gets healthy",
                            {"app.py": SCRIPTED_APP + 'HEALTH = lambda: ("broken", 500)\n'})
    record = deploy(box, "staging", broken)
    assert record["state"] == "failed", record
    assert props(box, "staging")["ActiveRelease"] == first

    # A staging instance killed: systemd restarts it (or recovery replaces it), staging serves
    # its release again; production never notices.
    port = props(box, "staging")["ActivePort"]
    box.run("systemctl", "kill", "--signal=SIGKILL", f"bluegreen-app@{port}.service")
    deadline = time.monotonic() + 90
    while (answer := http(box, "GET", "/", port=STAGING_PORT)).status != 200 or \
            answer.body["release"] != first:  # refused or reset while it is restarted
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)
    wait_state(box, "staging")
    assert props(box, "staging")["ActiveRelease"] == first
    staging.revert_to(first, "Back to the first release")


def test_a_controller_restart_in_a_staging_deploy_reconciles_both_apps(
        box: Sandbox, repos: dict[str, App], production_untouched: None) -> None:
    staging = repos["staging"]
    serving = props(box, "staging")
    slow = staging.commit("Staging release that takes a while to get healthy",
                          {"app.py": SCRIPTED_APP + 'HEALTH = lambda: ("starting", 503) '
                           'if time.monotonic() - STARTED < 40 else "ok"\n'})
    deployment_id = call_app(box, "staging", "Deploy", "s", slow)
    deadline = time.monotonic() + 120
    while [step for step, *_ in call_app(box, "staging", "GetDeployment", "s",
                                        deployment_id)["steps"]][-1:] != ["health"]:
        assert time.monotonic() < deadline, "the staging deploy never reached its health check"
        time.sleep(0.1)
    new_port = call_app(box, "staging", "GetDeployment", "s", deployment_id)["port"]
    assert new_port in instances_of(box, "staging")
    kill_controller(box)

    wait_state(box, "default")
    wait_state(box, "staging")
    record = call_app(box, "staging", "GetDeployment", "s", deployment_id)
    assert record["state"] == "interrupted", record
    after = props(box, "staging")
    assert (after["ActiveRelease"], after["ActivePort"]) == (serving["ActiveRelease"], serving["ActivePort"])
    assert instances_of(box, "staging") == [serving["ActivePort"]]
    assert get(box, STAGING_PORT)["release"] == serving["ActiveRelease"]
    staging.revert_to(serving["ActiveRelease"], "Back to the serving release")


def test_both_apps_deploy_at_once_and_neither_reads_the_others_secrets(
        box: Sandbox, repos: dict[str, App]) -> None:
    production_sha = repos["production"].commit("Production release 3",
                                                {"Procfile": PRODUCTION_PROCFILE})
    staging_before = repos["staging"].head()
    try:
        staging_sha = repos["staging"].commit("Staging release 3", {"Procfile": STAGING_PROCFILE})
        with Load(box, "--port", "5000", "--fast", "2", "--slow", "1") as load:
            production_id = call_app(box, "default", "Deploy", "s", "")
            deadline = time.monotonic() + 120
            while [step for step, *_ in call_app(box, "default", "GetDeployment", "s",
                                                production_id)["steps"]][-1:] != ["migrate"]:
                assert time.monotonic() < deadline, "production's deploy never reached its release phase"
                time.sleep(0.1)
            # Production's release phase runs, with its secret, while staging's deploys.
            staging = wait_done(box, "staging", call_app(box, "staging", "Deploy", "s", ""))
            box.run("touch", "/var/lib/bluegreen/data/release-may-end")
            production = wait_done(box, "default", production_id)
        assert staging["state"] == "succeeded", staging
        assert production["state"] == "succeeded", production
        assert production["started_at"] < staging["started_at"]
        assert staging["finished_at"] < production["finished_at"]
        assert props(box, "default")["ActiveRelease"] == production_sha
        assert props(box, "staging")["ActiveRelease"] == staging_sha
        assert load.report["failed"] == 0, load.report["failures_by_kind"]
        # Staging's worker has its own secret, and found production's nowhere.
        data = "/var/lib/bluegreen/app-data/staging"
        deadline = time.monotonic() + 30
        while box.run("test", "-s", f"{data}/seeker-token", check=False).returncode != 0:
            assert time.monotonic() < deadline, box.journal("-u", "bluegreen-worker@*", "-n", "30")
            time.sleep(0.1)
        assert box.run("cat", f"{data}/seeker-token").stdout.strip() == "staging-token"
        assert box.run("cat", f"{data}/seeker-found").stdout.strip() == ""
    finally:  # the app beta, later, deploys staging's repository and has no secrets
        git(repos["staging"].work, "rm", "-q", "Procfile")
        repos["staging"].revert_to(staging_before, "Without the release phase that wants staging's secret")


def test_reload_adds_and_removes_an_app_and_refuses_a_shared_port(
        box: Sandbox, repos: dict[str, App]) -> None:
    production, staging = props(box, "default"), props(box, "staging")
    box.write("/etc/bluegreen/apps/beta.toml",
              f'[repository]\nurl = "/srv/staging.git"\nwatch = false\n[ports]\npublic = {STAGING_PORT}\n')
    refused = box.run("systemctl", "reload", "bluegreen.service", check=False)
    assert refused.returncode != 0
    journal = box.journal("-u", "bluegreen.service", "-n", "20")
    assert ("staging.toml:6: ports.public: 5100 is already the public port of the app beta "
            "(/etc/bluegreen/apps/beta.toml)") in journal, journal

    box.write("/etc/bluegreen/apps/beta.toml",
              '[repository]\nurl = "/srv/staging.git"\nwatch = false\n[ports]\npublic = 5200\n')
    box.run("systemctl", "reload", "bluegreen.service")
    wait_state(box, "beta")
    assert get(box, 5200)["release"] == repos["staging"].head()
    beta_port = props(box, "beta")["ActivePort"]

    box.path("/etc/bluegreen/apps/beta.toml").unlink()
    box.run("systemctl", "reload", "bluegreen.service")
    active = box.run("systemctl", "is-active", f"bluegreen-app@{beta_port}.service",
                     check=False).stdout.strip()
    assert active in ("inactive", "unknown"), active
    assert http(box, "GET", "/", port=5200).status == 0  # nothing listens there any more
    assert box.path("/var/lib/bluegreen/apps/beta/bluegreen.db").exists()  # its records stay
    assert "beta" not in box.run("bluegreenctl", "apps").stdout
    for app, before in (("default", production), ("staging", staging)):
        now = props(box, app)
        assert (now["ActiveRelease"], now["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    # After all those deploys, rollbacks, failures and a removed app, only the instances and
    # workers that run keep a drop-in with their secrets.
    running = box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                      "bluegreen-app@*.service", "bluegreen-worker@*").stdout
    dropins = box.run("sh", "-c", "cd /run/systemd/system && echo bluegreen-*.d").stdout
    assert sorted(dropins.split()) == sorted(f"{line.split()[0]}.d" for line in running.splitlines()
                                             if line.strip())


def test_reload_refuses_a_port_another_app_still_serves(box: Sandbox, repos: dict[str, App]) -> None:
    """Staging moves off its port (that applies at its next deploy) and a new app takes the
    port in the same reload: the new app would join staging's listeners, so nothing changes."""
    staging = props(box, "staging")
    box.write(STAGING_FILE, STAGING_CONFIG.replace(f"public = {STAGING_PORT}", "public = 5300"))
    box.write("/etc/bluegreen/apps/beta.toml",
              f'[repository]\nurl = "/srv/staging.git"\nwatch = false\n[ports]\npublic = {STAGING_PORT}\n')
    try:
        refused = box.run("systemctl", "reload", "bluegreen.service", check=False)
        assert refused.returncode != 0
        journal = box.journal("-u", "bluegreen.service", "-n", "20")
        assert (f"beta.toml:5: ports.public: the app beta cannot take port {STAGING_PORT}: the app "
                "staging still serves on it") in journal, journal
        assert "beta" not in box.run("bluegreenctl", "apps").stdout
        assert get(box, STAGING_PORT)["release"] == staging["ActiveRelease"]
        assert http(box, "GET", "/", port=5300).status == 0
    finally:
        box.path("/etc/bluegreen/apps/beta.toml").unlink()
        box.write(STAGING_FILE, STAGING_CONFIG)
        box.run("systemctl", "reload", "bluegreen.service")
