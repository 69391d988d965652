"""A real app (examples/notes): its own pinned dependencies, a secret, a SQLite database in the
data directory, Alembic migrations in the release phase and a worker, deployed under load.

The container has no network: pip installs from a wheelhouse built on the test host
(tests/wheelhouse.py). The tests run in order and share one repository, each release on top
of the last: 1 (the example), 2 (release-2.patch: a migration and a new dependency), 3 (code
only), then a bad requirement and a failing migration, which must leave release 3 serving.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bluegreen.release import pipcache
from tests import wheelhouse
from tests.integration.helpers import (
    App,
    Load,
    call,
    configure,
    git,
    http,
    main_pid,
    properties,
    public,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import ROOT, Sandbox

pytestmark = pytest.mark.integration

NOTES = ROOT / "examples/notes"
VARIANTS = NOTES / "variants"
SECRET = "notes-" + "Sup3rS3cretK3y" * 3
DATA_DIR = "/var/lib/bluegreen/data"
ENVIRONMENTS = "/var/lib/bluegreen/environments"
PIP_CACHE = f"/var/cache/{pipcache.cache_directory('default')}"
DATABASE = "notes-from-config.db"
STEPS = ["resolve", "materialize", "verify", "migrate", "start", "health", "switch", "drain",
         "watch", "workers", "stop-old"]
# The app answers only the Host names it trusts (Flask 3.1's TRUSTED_HOSTS): the health checks
# must send health_host. [processes] adds a second worker to the Procfile's one. No app.wsgi:
# the Procfile's web line names the app, as it does for Heroku.
CONFIG = f"""post_switch_watch = 1
[app]
health_host = "notes.internal"
[app.environment]
DATABASE_URL = "sqlite:///{{data_dir}}/{DATABASE}"
TRUSTED_HOSTS = "notes.internal,127.0.0.1"
WORKER_POLL_SECONDS = "0.2"
[health]
interval = 0.2
[release]
timeout = 300
[processes]
worker2 = "python worker.py"
"""
WORKERS = ("worker", "worker2")


class Notes(App):
    """The example app's repository inside the sandbox, and what the tests learn on the way."""

    def __init__(self, box: Sandbox) -> None:
        super().__init__(box)
        self.releases: dict[str, str] = {}  # name -> commit
        self.note_id = 0
        self.ps: list[str] = []  # process lists sampled while deploys ran

    def create(self) -> str:
        shutil.copytree(NOTES, self.work, ignore=shutil.ignore_patterns("variants", "__pycache__"))
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "add", ".")
        git(self.work, "commit", "-q", "-m", "Notes")
        subprocess.run(["git", "clone", "-q", "--bare", str(self.work), str(self.bare)], check=True)
        return git(self.work, "rev-parse", "HEAD")

    def apply(self, patch: str, message: str) -> str:
        git(self.work, "apply", str(VARIANTS / patch))
        return self.commit(message, {})

    def edit(self, name: str, old: str, new: str, message: str) -> str:
        text = (self.work / name).read_text()
        assert old in text, f"{name} has no {old!r}"
        return self.commit(message, {name: text.replace(old, new)})


@pytest.fixture(scope="session")
def wheels() -> Path:
    built = wheelhouse.build()
    print(f"\nwheelhouse {wheelhouse.describe(built)}")
    return built


@pytest.fixture(scope="module")
def notes(box: Sandbox, wheels: Path) -> Notes:
    """bluegreen configured for the notes app, its secret in place, release 1 serving."""
    box.use_wheelhouse(wheels)
    repository = Notes(box)
    repository.releases["1"] = repository.create()
    configure(box, CONFIG)
    box.write("/etc/bluegreen/secrets/SECRET_KEY", SECRET + "\n", mode=0o600)
    box.path("/etc/bluegreen/secrets").chmod(0o700)
    # An entry of pip's cache past its size limit, unused for long (sparse: it takes no room):
    # the first build prunes it.
    box.run("install", "-d", "-o", "bluegreen-build", "-g", "bluegreen-build", f"{PIP_CACHE}/http")
    box.run("truncate", "-s", f"{pipcache.MAX_BYTES + (1 << 20)}", f"{PIP_CACHE}/http/stale")
    box.run("chown", "bluegreen-build:", f"{PIP_CACHE}/http/stale")
    box.run("touch", "-d", "2020-01-01", f"{PIP_CACHE}/http/stale")
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    wait_serving(box, timeout=300)
    return repository


class Sampler:
    """Collects ``ps`` argv lists while the block runs (a secret must never show in them)."""

    def __init__(self, box: Sandbox, into: list[str]) -> None:
        self.box = box
        self.into = into
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set():
            self.into.append(self.box.run("ps", "-eo", "args", "--no-headers", check=False).stdout)
            self.stop.wait(0.1)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()


def deploy(box: Sandbox) -> dict[str, Any]:
    return wait_deployment(box, call(box, "Deploy", "s", ""), timeout=300)


def steps(record: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {name: (float(started), float(finished)) for name, started, finished in record["steps"]}


def environments(box: Sandbox) -> list[str]:
    out = box.run("find", ENVIRONMENTS, "-mindepth", "1", "-maxdepth", "1", "-type", "d").stdout
    return sorted(out.split())


def post(box: Sandbox, path: str, body: dict[str, Any]) -> Any:
    response = http(box, "POST", path, json.dumps(body), port=5000)
    assert response.status in (201, 202), response
    return response.body


def wait_job(box: Sandbox, job_id: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = public(box, f"/jobs/{job_id}")
        if job["state"] == "done":
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not done after {timeout} s: {job}\n"
                         f"{box.journal('-u', 'bluegreen-worker@*', '-n', '40')}")


def worker_units(box: Sandbox) -> dict[str, str]:
    """Every loaded worker unit and its active state."""
    out = box.run("systemctl", "list-units", "--all", "--plain", "--no-legend",
                  "bluegreen-worker@*").stdout
    return {line.split()[0]: line.split()[2] for line in out.splitlines() if line.strip()}


def workers_of(port: int) -> set[str]:
    return {f"bluegreen-worker@{port}-{name}.service" for name in WORKERS}


def sqlite(box: Sandbox, query: str) -> str:
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
              "print('\\n'.join('|'.join(map(str, row)) for row in c.execute(sys.argv[2])))")
    # As the app's user: a connection may create the WAL's files, which the app must own.
    return box.run("python3", "-c", script, f"{DATA_DIR}/{DATABASE}", query,
                   user="bluegreen-app").stdout.strip()


def test_release_1_runs_with_its_own_dependencies_secret_and_data(box: Sandbox, notes: Notes) -> None:
    props = properties(box)
    assert props["ActiveRelease"] == notes.releases["1"]
    record = call(box, "ListDeployments", "u", "1")[0]
    assert record["state"] == "succeeded", record
    names = [name for name, _started, _finished in record["steps"]]
    assert names[:7] == STEPS[:7], names  # nothing served before: no drain or stop-old
    verify = steps(record)["verify"]
    print(f"\nfirst build of the environment: verify took {verify[1] - verify[0]:.2f} s")

    assert "serving app:app, the WSGI app the Procfile's web line names" in box.journal(
        "-u", "bluegreen.service", "-n", "200")
    assert 'BLUEGREEN_WSGI="app:app"' in box.run(
        "cat", f"/run/bluegreen/instances/{props['ActivePort']}.env").stdout

    index = public(box)
    assert index["version"] == "1" and index["release"] == notes.releases["1"]
    assert index["server"] == "gunicorn/23.0.0", index  # the app's pin, not Debian's 20.1.0
    assert index["secret_fingerprint"] == hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    assert index["schema"] == "0001"
    assert len(environments(box)) == 1
    # pip's cache is the app's own, and the build pruned it to its size limit.
    assert not box.exists("/var/cache/bluegreen/pip")
    assert not box.exists(f"{PIP_CACHE}/http/stale")
    build_log = box.journal(f"DEPLOYMENT_ID={record['id']}", "-o", "cat")
    assert "pip's cache: deleted 1 files" in build_log, build_log[-2000:]

    # The data directory: the app's user only; DATABASE_URL from [app.environment] with
    # {data_dir} replaced reached the release phase (which made the file) and the instance.
    assert box.run("stat", "-c", "%U %G %a", DATA_DIR).stdout.split() == \
        ["bluegreen-app", "bluegreen-app", "700"]
    assert box.exists(f"{DATA_DIR}/{DATABASE}") and not box.exists(f"{DATA_DIR}/notes.db")

    notes.note_id = post(box, "/notes", {"text": "written under release 1"})["id"]
    job = wait_job(box, post(box, "/jobs", {"text": "shout it"})["id"])
    assert job["result"] == "SHOUT IT" and job["processed_by"] == notes.releases["1"]
    assert worker_units(box) == dict.fromkeys(workers_of(props["ActivePort"]), "active")


def test_three_releases_under_load_lose_no_request(box: Sandbox, notes: Notes) -> None:
    with Load(box, "--fast", "4", "--slow", "0") as load, Sampler(box, notes.ps):
        # Release 2: new dependencies (a second environment) and migration 0002.
        notes.releases["2"] = notes.apply("release-2.patch", "Tags on notes")
        second = deploy(box)
        assert second["state"] == "succeeded" and second["commit"] == notes.releases["2"], second
        assert len(environments(box)) == 2
        index = public(box)
        assert index["version"] == "2"
        tagged = post(box, "/notes", {"text": "tagged", "tags": ["Blue Green", "Ops"]})["id"]
        assert public(box, f"/notes/{tagged}")["tags"] == ["blue-green", "ops"]

        # Release 3: code only, the environment of release 2 reused.
        before = environments(box)
        notes.releases["3"] = notes.edit("app.py", 'APP_VERSION = "2"', 'APP_VERSION = "3"',
                                         "Release 3")
        third = deploy(box)
        assert third["state"] == "succeeded" and third["commit"] == notes.releases["3"], third
        assert environments(box) == before

    report = load.report
    print(f"\n{report['requests']} requests, {report['failed']} failed, versions {report['versions']}")
    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    assert report["requests"] > 300
    assert {"1", "2", "3"} <= set(report["versions"]), report["versions"]

    # Migration 0002 ran in the release phase, before release 2's instance started, and the
    # instance found it done at its first request (its first health check).
    timings = steps(second)
    assert list(timings)[:4] == STEPS[:4]
    assert timings["migrate"][1] <= timings["start"][0]
    assert index["schema"] == "0002"

    # A code-only release finds its environment there, so verify is the import check alone:
    # no dependency is installed. Its time is a figure, not a test (the machine's spare CPU
    # decides it): printed with and without the load generator on the same cores.
    notes.releases["3"] = notes.edit("app.py", 'APP_VERSION = "3"', 'APP_VERSION = "3"  # again',
                                     "Release 3, code only again")
    again = deploy(box)
    assert again["state"] == "succeeded", again
    assert environments(box) == before
    assert "built environment" in box.journal(f"DEPLOYMENT_ID={second['id']}")  # new dependencies
    for name, record in (("under load", third), ("alone", again)):
        told = box.journal(f"DEPLOYMENT_ID={record['id']}")
        assert "has the dependencies already" in told, told[-2000:]
        assert "installing the dependencies" not in told and "built environment" not in told, told[-2000:]
        verify = steps(record)["verify"]
        print(f"code-only release ({name}): verify took {verify[1] - verify[0]:.2f} s")

    note = public(box, f"/notes/{notes.note_id}")
    assert note["text"] == "written under release 1" and note["release"] == notes.releases["1"]
    assert note["tags"] == []  # the column's server default
    assert public(box)["version"] == "3"


def test_the_serving_release_runs_the_worker(box: Sandbox, notes: Notes) -> None:
    serving = workers_of(properties(box)["ActivePort"])
    units = worker_units(box)
    assert {unit for unit, state in units.items() if state == "active"} == serving, units
    job = wait_job(box, post(box, "/jobs", {"text": "done by release 3"})["id"])
    assert job["processed_by"] == notes.releases["3"], job
    # The old releases' workers were stopped gracefully: each wrote its last heartbeat.
    beats = public(box, "/workers")["workers"]
    running = [beat for beat in beats if beat["state"] == "running"]
    assert running and all(beat["release"] == notes.releases["3"] for beat in running), beats
    assert {beat["release"] for beat in beats if beat["state"] == "stopped"} >= \
        {notes.releases["1"], notes.releases["2"]}, beats


def test_a_bad_requirement_fails_at_verify_while_the_old_release_serves(box: Sandbox,
                                                                         notes: Notes) -> None:
    requirements = (notes.work / "requirements.txt").read_text()
    sha = notes.commit("A package that does not exist",
                       {"requirements.txt": requirements + "nonexistent-package-xyz==1.0\n"})
    with Load(box, "--fast", "2", "--slow", "0") as load, Sampler(box, notes.ps):
        record = deploy(box)
    assert record["state"] == "failed" and record["commit"] == sha, record
    assert record["failed_step"] == "verify", record
    assert "nonexistent-package-xyz" in record["reason"], record["reason"]
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert properties(box)["ActiveRelease"] == notes.releases["3"]
    assert public(box)["version"] == "3"
    # pip's whole output is in the journal, under the deployment's id.
    assert "No matching distribution found" in box.journal(f"DEPLOYMENT_ID={record['id']}")


def test_a_failing_migration_fails_at_migrate_while_the_old_release_serves(box: Sandbox,
                                                                          notes: Notes) -> None:
    git(notes.work, "checkout", notes.releases["3"], "--", "requirements.txt")
    sha = notes.releases["broken"] = notes.apply("broken-migration.patch", "A migration that fails")
    with Load(box, "--fast", "2", "--slow", "0") as load, Sampler(box, notes.ps):
        record = deploy(box)
    assert record["state"] == "failed" and record["commit"] == sha, record
    assert record["failed_step"] == "migrate", record
    assert record["reason"], record
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert properties(box)["ActiveRelease"] == notes.releases["3"]
    assert public(box)["version"] == "3"
    assert "migration 0003 fails on purpose" in box.journal(f"DEPLOYMENT_ID={record['id']}")
    assert sqlite(box, "SELECT version_num FROM alembic_version") == "0002"
    units = worker_units(box)
    assert {unit for unit, state in units.items() if state == "active"} == \
        workers_of(properties(box)["ActivePort"]), units


def test_the_secret_never_shows(box: Sandbox, notes: Notes) -> None:
    assert box.run("stat", "-c", "%U %a", "/etc/bluegreen/secrets/SECRET_KEY").stdout.split() == \
        ["root", "600"]
    units = [line.split()[0] for line in box.run(
        "systemctl", "list-units", "--all", "--plain", "--no-legend", "bluegreen-app@*",
        "bluegreen-worker@*").stdout.splitlines() if line.strip()]
    assert any(unit.startswith("bluegreen-worker@") for unit in units), units
    records = call(box, "ListDeployments", "u", "100")
    places = {
        "ps": "\n".join(notes.ps) + box.run("ps", "-eo", "args", "--no-headers").stdout,
        "systemctl show": box.run("systemctl", "show", *units).stdout,
        "journal": box.run("journalctl", "--no-pager", "-o", "export").stdout,
        "/run/bluegreen": box.sh("find /run/bluegreen -type f -exec cat {} +").stdout,
        "bluegreen.toml": box.path("/etc/bluegreen/bluegreen.toml").read_text(),
        "records over D-Bus": json.dumps(records) + json.dumps(properties(box)),
        "records over HTTP": "".join(json.dumps(http(box, "GET", path).body) for path in
                                     ("/", "/status", "/history?limit=100", "/health",
                                      *(f"/deployments/{r['id']}" for r in records))),
    }
    assert "alembic" in places["ps"] or "pip" in places["ps"], "the sampling caught no release phase"
    assert "worker.py" in places["ps"] and "gunicorn" in places["ps"]
    for place, text in places.items():
        assert text, place
        assert SECRET not in text, f"the secret shows in {place}"
    # ... while the app did get it.
    assert public(box)["secret_fingerprint"] == hashlib.sha256(SECRET.encode()).hexdigest()[:12]


def test_the_app_may_reach_the_network_by_default(box: Sandbox, notes: Notes) -> None:
    port = properties(box)["ActivePort"]
    for unit in (f"bluegreen-app@{port}.service", f"bluegreen-worker@{port}-worker.service"):
        shown = box.run("systemctl", "show", "-p", "IPAddressDeny", "-p", "User", unit).stdout
        assert "IPAddressDeny=\n" in shown and "User=bluegreen-app" in shown, (unit, shown)


def test_a_crashed_worker_is_restarted(box: Sandbox, notes: Notes) -> None:
    unit = f"bluegreen-worker@{properties(box)['ActivePort']}-worker.service"
    before = main_pid(box, unit)
    box.run("systemctl", "kill", "--signal=KILL", unit)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = main_pid(box, unit)
        state = box.run("systemctl", "is-active", unit, check=False).stdout.strip()
        if state == "active" and after not in (0, before):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"{unit} was not restarted: {state}, MainPID {after}")
    job = wait_job(box, post(box, "/jobs", {"text": "after the crash"})["id"])
    assert job["result"] == "AFTER THE CRASH"


def test_a_worker_that_cannot_start_does_not_roll_back_the_release(box: Sandbox,
                                                                    notes: Notes) -> None:
    git(notes.work, "read-tree", "-u", "--reset", notes.releases["3"])  # drop the failing migration
    procfile = (notes.work / "Procfile").read_text()
    sha = notes.commit("A worker that dies at once",
                       {"Procfile": procfile + "broken: python -c 'import sys; sys.exit(3)'\n"})
    record = deploy(box)
    assert record["state"] == "succeeded" and record["commit"] == sha, record
    notes.releases["4"] = sha
    port = properties(box)["ActivePort"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shown = box.run("bluegreenctl", "status", "--json").stdout
        workers = {w["name"]: w["state"] for w in json.loads(shown)["Workers"] if w["port"] == port}
        if workers.get("broken") == "failed/failed":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the broken worker never showed as failed: {shown}")
    assert workers["worker"] == "active/running" and workers["worker2"] == "active/running"
    assert "Worker:      broken" in box.run("bluegreenctl", "status").stdout
    assert properties(box)["ActiveRelease"] == sha


def test_a_rollback_runs_no_release_phase(box: Sandbox, notes: Notes) -> None:
    result = box.run("bluegreenctl", "rollback", notes.releases["3"], check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    record = call(box, "ListDeployments", "u", "1")[0]
    assert record["trigger"] == "rollback" and record["state"] == "succeeded", record
    assert "migrate" not in steps(record), record["steps"]
    assert properties(box)["ActiveRelease"] == notes.releases["3"]
    port = properties(box)["ActivePort"]
    assert {unit for unit, state in worker_units(box).items() if state == "active"} == \
        workers_of(port)


def test_a_host_rebooted_after_a_rollback_past_a_migration_serves_the_rolled_back_release(
        box: Sandbox, notes: Notes) -> None:
    # Release 1 knows schema 0001 only: its `alembic upgrade head` fails against the data at
    # 0002 ("Can't locate revision"). A rollback runs no release phase, and neither must the
    # start-up deploy that brings the rolled-back release back after a reboot.
    result = box.run("bluegreenctl", "rollback", notes.releases["1"], check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert properties(box)["ActiveRelease"] == notes.releases["1"]
    assert public(box, f"/notes/{notes.note_id}")["text"] == "written under release 1"

    box.reboot()
    props = wait_serving(box, timeout=300)
    assert props["ActiveRelease"] == notes.releases["1"], props
    startup = call(box, "ListDeployments", "u", "1")[0]
    assert (startup["trigger"], startup["state"]) == ("startup", "succeeded"), startup
    assert "migrate" not in steps(startup), startup["steps"]
    assert "release phase of " + notes.releases["1"][:12] + " not run" in \
        box.journal(f"DEPLOYMENT_ID={startup['id']}")
    index = public(box)
    assert index["version"] == "1" and index["release"] == notes.releases["1"], index
    assert public(box, f"/notes/{notes.note_id}")["text"] == "written under release 1"
    assert sqlite(box, "SELECT version_num FROM alembic_version") == "0002"


def test_deploying_an_older_release_whose_release_phase_fails_points_at_rollback(
        box: Sandbox, notes: Notes) -> None:
    # The migration that fails on purpose never ran to its end here: deployed by hand, it runs
    # again, fails, and the record says what to do with a release older than the data.
    broken = notes.releases["broken"]
    result = box.run("bluegreenctl", "deploy", broken, check=False, timeout=300)
    assert result.returncode != 0, result.stdout
    record = call(box, "ListDeployments", "u", "1")[0]
    assert (record["commit"], record["state"], record["failed_step"]) == (broken, "failed", "migrate")
    assert f"bluegreenctl rollback {broken[:12]}" in record["reason"], record["reason"]
    assert f"bluegreenctl rollback {broken[:12]}" in result.stdout + result.stderr
    assert properties(box)["ActiveRelease"] == notes.releases["1"]
