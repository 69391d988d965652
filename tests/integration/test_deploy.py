"""Deploying for real: systemd, D-Bus, socat, gunicorn and git in a throwaway container."""

from __future__ import annotations

import json
import re
import time

import pytest

from bluegreen.log import MessageId
from tests.integration.helpers import (
    App,
    busctl,
    call,
    deployment,
    http,
    main_pid,
    properties,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

UNITS = ("bluegreen.service", "bluegreen-api.socket", "bluegreen-api.service",
         "bluegreen-app@8123.service", "bluegreen-app@8123.socket",
         "bluegreen-worker@8123-worker.service",
         "bluegreen-forward@8123.service", "bluegreen-proxy@8123.service")

BROKEN_IMPORT = "import this_module_does_not_exist\n"
FAILING_HEALTH = '''from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "never served"


@app.get("/health")
def health():
    return "broken on purpose", 500
'''


@pytest.fixture(scope="module")
def config_extra() -> str:
    return settings(1, health={"deadline": 10})


def unit_state(box: Sandbox, unit: str) -> str:
    return box.run("systemctl", "is-active", unit, check=False).stdout.strip()


def test_units_pass_systemd_analyze_verify(box: Sandbox) -> None:
    result = box.run("systemd-analyze", "verify", "--man=no", *UNITS, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(("unit", "threshold"), [
    ("bluegreen-app@8123.service", 2.0),
    ("bluegreen-worker@8123-worker.service", 2.0),
    ("bluegreen-forward@8123.service", 2.0),
    ("bluegreen-proxy@8123.service", 2.0),
    ("bluegreen-haproxy.service", 2.0),
    ("bluegreen-api.service", 2.0),
    ("bluegreen.service", 5.0),
])
def test_units_are_hardened(box: Sandbox, unit: str, threshold: float) -> None:
    result = box.run("systemd-analyze", "security", "--no-pager", f"--threshold={threshold * 10:g}",
                     unit, check=False)
    assert result.returncode == 0, result.stdout[-600:]


@pytest.mark.parametrize("unit", [u for u in UNITS if u.startswith("bluegreen-") and u.endswith(".service")])
def test_every_unit_but_the_controller_reads_the_one_shared_sandbox(box: Sandbox, unit: str) -> None:
    dropins = box.run("systemctl", "show", "-P", "DropInPaths", unit).stdout.split()
    template = re.sub(r"@[^.]*\.", "@.", unit)
    assert f"/usr/lib/systemd/system/{template}.d/10-hardening.conf" in dropins
    assert {box.path(d).resolve() for d in dropins if d.endswith("10-hardening.conf")} == {
        box.path("/usr/lib/bluegreen/hardening.conf").resolve()}
    shown = box.run("systemctl", "show", "-p", "ProcSubset", "-p", "ProtectProc", "-p", "UMask",
                    "-p", "MemoryDenyWriteExecute", unit).stdout.split()
    assert sorted(shown) == ["MemoryDenyWriteExecute=yes", "ProcSubset=pid", "ProtectProc=invisible",
                             "UMask=0077"]


def test_start_brings_the_app_up_on_the_public_port(box: Sandbox, app: App) -> None:
    head = app.head()
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    props = wait_serving(box)
    page = public(box)
    assert page["version"] == "1"
    assert page["release"] == props["ActiveRelease"]
    assert props["ActiveRelease"] == head
    assert unit_state(box, f"bluegreen-app@{props['ActivePort']}.service") == "active"
    assert unit_state(box, f"bluegreen-forward@{props['ActivePort']}.service") == "active"
    assert 8000 <= props["ActivePort"] <= 8999


def test_deploy_over_dbus_switches_and_stops_the_old_unit(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    sha = app.commit("Second release")
    deployment_id = call(box, "Deploy", "s", "")
    record = wait_deployment(box, deployment_id)
    assert record["state"] == "succeeded", record
    assert record["commit"] == sha
    assert record["trigger"] == "dbus"
    assert [step[0] for step in record["steps"]] == [
        "resolve", "materialize", "verify", "start", "health", "switch", "drain", "watch", "stop-old"]
    after = properties(box)
    assert after["ActiveRelease"] == sha
    assert after["ActivePort"] == record["port"] != before["ActivePort"]
    assert public(box)["version"] == "2"
    old = before["ActivePort"]
    assert unit_state(box, f"bluegreen-app@{old}.service") == "inactive"
    assert unit_state(box, f"bluegreen-app@{old}.socket") == "inactive"
    assert f":{old} " not in box.run("ss", "-Hltn").stdout
    assert unit_state(box, f"bluegreen-forward@{old}.service") == "inactive"
    assert not box.exists(f"/run/bluegreen/instances/{old}.env")
    assert box.exists(f"/run/bluegreen/instances/{after['ActivePort']}.env")
    assert not box.exists(f"/run/bluegreen-app/{old}")  # its counters went with it


def test_metrics_count_what_each_instance_answered_by_release(box: Sandbox, app: App) -> None:
    """Counted inside the instance (its gunicorn's hooks), read by the controller."""
    props = properties(box)
    release, port = props["ActiveRelease"], props["ActivePort"]

    def answered(status_class: str) -> int:
        text = call(box, "GetMetrics")
        label = f'bluegreen_app_responses_total{{release="{release}",port="{port}",class="{status_class}"}} '
        found = [line for line in text.splitlines() if line.startswith(label)]
        assert len(found) == 1, text
        return int(found[0].rsplit(" ", 1)[1])

    ok, missing = answered("2xx"), answered("4xx")
    for _ in range(20):
        public(box)
    assert http(box, "GET", "/no-such-page", port=5000).status == 404
    assert answered("2xx") >= ok + 20  # and the health checks' own
    assert answered("4xx") == missing + 1
    assert box.exists(f"/run/bluegreen-app/{port}")


def test_deploy_over_http(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    sha = app.commit("Third release")
    response = http(box, "POST", "/deploy", json.dumps({"ref": "main"}), unix=True)
    assert response.status == 202, response
    record = wait_deployment(box, response.body["id"])
    assert record["state"] == "succeeded", record
    assert record["trigger"] == "http"
    assert public(box)["version"] == "3"
    assert unit_state(box, f"bluegreen-app@{before['ActivePort']}.service") == "inactive"

    status = http(box, "GET", "/status")
    assert status.status == 200
    assert status.body["release"] == sha
    assert status.body["forwarder_target"] == record["port"]
    assert status.body["last_deployment"]["id"] == response.body["id"]
    assert [i["port"] for i in status.body["instances"] if i["state"] == "active"] == [record["port"]]
    assert http(box, "GET", "/health").status == 200
    history = http(box, "GET", "/history?limit=2")
    assert [d["id"] for d in history.body] == [response.body["id"], str(int(response.body["id"]) - 1)]
    assert http(box, "GET", f"/deployments/{response.body['id']}").body["commit"] == sha


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    pytest.param("{not json", "application/json", 400, "malformed JSON", id="malformed"),
    pytest.param('{"ref": 5}', "application/json", 400, "must be a string", id="wrong-type"),
    pytest.param('["main"]', "application/json", 400, "JSON object", id="not-an-object"),
    pytest.param('{"ref": "main", "force": true}', "application/json", 400, "unknown field",
                 id="unknown-field"),
    pytest.param('{"ref": "../etc"}', "application/json", 400, "ref", id="path-ref"),
    pytest.param('{"ref": "--upload-pack=touch /tmp/x"}', "application/json", 400, "ref",
                 id="option-ref"),
    pytest.param('{"ref": "no-such-branch"}', "application/json", 422, "no branch, tag or commit",
                 id="unknown-ref"),
    pytest.param("ref=main", "application/x-www-form-urlencoded", 415, "JSON", id="form-body"),
    pytest.param('{"ref": "' + "a" * 70000 + '"}', "application/json", 413, "larger than",
                 id="oversize"),
])
def test_bad_deploy_requests_get_a_clear_error_and_change_nothing(
        box: Sandbox, app: App, body: str, content_type: str, status: int, message: str) -> None:
    before = wait_serving(box)
    response = http(box, "POST", "/deploy", body, content_type=content_type, unix=True)
    assert response.status == status, response
    assert isinstance(response.body, dict) and response.body["message"], response
    assert message in response.body["message"]
    after = properties(box)
    assert after["LastDeployment"] == before["LastDeployment"]
    assert after["ActiveRelease"] == before["ActiveRelease"]
    assert after["ActivePort"] == before["ActivePort"]


def test_unknown_paths_and_methods_answer_json(box: Sandbox, app: App) -> None:
    assert http(box, "GET", "/nope").status == 404
    response = http(box, "GET", "/deploy")
    assert response.status == 405
    assert response.body["error"] == "MethodNotAllowed"
    assert http(box, "GET", "/deployments/999999").status == 404


def test_a_release_that_fails_to_import_never_receives_traffic(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    version = public(box)["version"]
    good = app.head()
    broken = app.commit("Break the import", {"app.py": BROKEN_IMPORT + (app.work / "app.py").read_text()})
    record = wait_deployment(box, call(box, "Deploy", "s", broken))
    assert record["state"] == "failed"
    assert record["failed_step"] == "verify"
    assert "No module named 'this_module_does_not_exist'" in record["reason"], record["reason"]
    assert record["port"] == 0  # no instance was ever started
    after = properties(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert public(box)["version"] == version
    journal = box.run("journalctl", "--no-pager", "-o", "json", f"MESSAGE_ID={MessageId.DEPLOY_FAILED}",
                      f"DEPLOYMENT_ID={record['id']}").stdout
    assert journal.strip(), "no 'deployment failed' journal entry"
    app.revert_to(good, "Revert the broken import")


def test_a_release_whose_health_fails_never_receives_traffic(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    version = public(box)["version"]
    original = (app.work / "app.py").read_text()
    bad = app.commit("Health check returns 500", {"app.py": FAILING_HEALTH})
    started = time.monotonic()
    record = wait_deployment(box, call(box, "Deploy", "s", bad))
    assert record["state"] == "failed"
    assert record["failed_step"] == "health"
    assert "HTTP 500" in record["reason"], record["reason"]
    assert time.monotonic() - started < 30
    assert unit_state(box, f"bluegreen-app@{record['port']}.service") == "inactive"
    after = properties(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert public(box)["version"] == version
    app.commit("Repair the health check", {"app.py": original})


def test_concurrent_deploys_exactly_one_runs(box: Sandbox, app: App) -> None:
    wait_serving(box)
    app.commit("Concurrent release")
    script = ("for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\\n' -X POST "
              "--unix-socket /run/bluegreen/api.sock http://localhost/deploy & done; "
              "for i in 1 2 3; do busctl --system call org.bluegreen1 /org/bluegreen1 "
              "org.bluegreen1.Manager Deploy s '' 2>&1 & done; wait")
    out = box.sh(script).stdout.split("\n")
    accepted = [line for line in out if line.strip() in ("202",) or line.startswith('s "')]
    refused = [line for line in out if line.strip() == "409" or "Busy" in line or "running" in line
               or "prepared" in line]
    assert len(accepted) == 1, out
    assert len(refused) == 6, out
    props = properties(box)
    current = props["CurrentDeployment"] or props["LastDeployment"]
    record = wait_deployment(box, current)
    assert record["state"] == "succeeded", record


def test_a_busy_error_names_the_running_deployment(box: Sandbox, app: App) -> None:
    wait_serving(box)
    app.commit("Slow health release")
    first = call(box, "Deploy", "s", "")
    second = busctl(box, "call", "org.bluegreen1", "/org/bluegreen1", "org.bluegreen1.Manager",
                    "Deploy", "s", "", check=False)
    assert second.returncode != 0
    assert f"deployment {first}" in second.stderr, second.stderr
    assert wait_deployment(box, first)["state"] == "succeeded"


def test_the_journal_tells_the_story_with_structured_fields(box: Sandbox, app: App) -> None:
    props = wait_serving(box)
    last = props["LastDeployment"]
    entries = [json.loads(line) for line in box.run(
        "journalctl", "--no-pager", "-o", "json", "-u", "bluegreen.service",
        f"DEPLOYMENT_ID={last}").stdout.splitlines()]
    ids = {e.get("MESSAGE_ID") for e in entries}
    assert MessageId.DEPLOY_STARTED in ids
    assert MessageId.DEPLOY_SWITCHED in ids
    assert MessageId.DEPLOY_SUCCEEDED in ids
    succeeded = next(e for e in entries if e.get("MESSAGE_ID") == MessageId.DEPLOY_SUCCEEDED)
    assert succeeded["RELEASE"] == props["ActiveRelease"]
    assert succeeded["PORT"] == str(props["ActivePort"])
    steps = [e["STEP"] for e in entries if "STEP" in e and e.get("MESSAGE_ID") is None]
    assert steps[:5] == ["materialize", "verify", "start", "health", "switch"]
    assert any(e.get("UNIT") == f"bluegreen-app@{props['ActivePort']}.service" for e in entries)


def test_history_survives_a_controller_restart(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    before_pid = main_pid(box, f"bluegreen-app@{before['ActivePort']}.service")
    box.run("systemctl", "restart", "bluegreen.service")
    after = wait_serving(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert after["LastDeployment"] == before["LastDeployment"]
    pid = main_pid(box, f"bluegreen-app@{after['ActivePort']}.service")
    assert pid == before_pid
    assert deployment(box, after["LastDeployment"])["state"] in ("succeeded", "failed")


def test_unprivileged_users_may_read_but_not_deploy(box: Sandbox, app: App) -> None:
    wait_serving(box)
    read = busctl(box, "get-property", "org.bluegreen1", "/org/bluegreen1",
                  "org.bluegreen1.Manager", "State", user="nobody")
    assert "serving" in read.stdout
    denied = busctl(box, "call", "org.bluegreen1", "/org/bluegreen1", "org.bluegreen1.Manager",
                    "Deploy", "s", "", check=False, user="nobody")
    assert denied.returncode != 0
    assert "Access denied" in denied.stderr or "AccessDenied" in denied.stderr, denied.stderr


def test_cli_shows_each_step_and_fails_with_the_reason(box: Sandbox, app: App) -> None:
    wait_serving(box)
    app.commit("Release via the CLI")
    result = box.run("bluegreenctl", "deploy", check=False)
    assert result.returncode == 0, result.stderr
    for step in ("materialize", "verify", "start", "health", "switch", "drain", "watch", "stop-old"):
        assert step in result.stdout, result.stdout
    assert "succeeded" in result.stdout
    bad = box.run("bluegreenctl", "deploy", "no-such-ref", check=False)
    assert bad.returncode == 2
    assert "no branch, tag or commit" in bad.stderr
    status = box.run("bluegreenctl", "status")
    assert "serving" in status.stdout


def test_cli_verbs_json_and_exit_statuses(box: Sandbox, app: App) -> None:
    props = wait_serving(box)
    last = props["LastDeployment"]
    shown = json.loads(box.run("bluegreenctl", "show", last, "--json").stdout)
    assert shown["id"] == last and shown["steps"][0]["step"] == "resolve"
    history = json.loads(box.run("bluegreenctl", "history", "-n", "2", "--json").stdout)
    assert history[0]["id"] == last and len(history) == 2
    status = json.loads(box.run("bluegreenctl", "status", "--json").stdout)
    assert status["ActiveRelease"] == props["ActiveRelease"]
    logs = box.run("bluegreenctl", "logs", last).stdout
    assert f"deployment {last} succeeded" in logs and "Booting worker" in logs
    entries = json.loads(box.run("bluegreenctl", "logs", last, "--json").stdout)
    assert any(e["step"] == "switch" for e in entries)
    assert box.run("bluegreenctl", "show", "999999", check=False).returncode == 4
    assert box.run("bluegreenctl", "rollback", "999999", check=False).returncode == 2
    assert box.run("bluegreenctl", "frobnicate", check=False).returncode == 2
    app.commit("Release to collide with")
    first = box.run("bluegreenctl", "deploy", "--no-wait").stdout.strip()
    busy = box.run("bluegreenctl", "deploy", check=False)
    assert busy.returncode == 5, busy.stderr
    assert f"deployment {first}" in busy.stderr
    assert wait_deployment(box, first)["state"] == "succeeded"
    assert "bluegreenctl" in box.run("bash", "-c", "source /usr/share/bash-completion/completions/"
                                     "bluegreenctl && complete -p bluegreenctl").stdout



def test_api_listen_moves_the_api_socket(box: Sandbox, app: App) -> None:
    config = box.path("/etc/bluegreen/bluegreen.toml")
    original = config.read_text()
    try:
        config.write_text(original + '[api]\nlisten = "127.0.0.1:5002"\n')
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "bluegreen-api.socket")
        assert http(box, "GET", "/health", port=5002).status == 200
        listening = box.run("systemctl", "show", "-P", "Listen", "bluegreen-api.socket").stdout
        assert "127.0.0.1:5002 (Stream)" in listening and "5001" not in listening, listening
        assert "/run/bluegreen/api.sock (Stream)" in listening, listening  # kept: changes go there
    finally:
        config.write_text(original)
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "bluegreen-api.socket")
    assert http(box, "GET", "/health").status == 200
