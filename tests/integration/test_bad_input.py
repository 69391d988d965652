"""Bad input and unwelcome callers: each gets a clear refusal, and nothing changes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.integration.helpers import (
    API_SOCKET,
    REPO,
    App,
    Load,
    busctl,
    call,
    configure,
    dbus_error,
    http,
    main_pid,
    properties,
    serving_app,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

MANAGER = ("org.bluegreen1", "/org/bluegreen1", "org.bluegreen1.Manager")
CONFIG = "/etc/bluegreen/bluegreen.toml"
EXTRA = settings(0, workers=4)


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    return serving_app(box, EXTRA)


@pytest.mark.parametrize(("member", "signature", "body", "types", "error"), [
    pytest.param("Deploy", "i", [5], None, "org.freedesktop.DBus.Error.UnknownMethod", id="wrong-type"),
    pytest.param("Deploy", "s", ["--upload-pack=touch /tmp/pwned"], None, "org.bluegreen1.Error.InvalidRef",
                 id="option-ref"),
    pytest.param("Deploy", "s", ["../../etc/passwd"], None, "org.bluegreen1.Error.InvalidRef", id="path-ref"),
    pytest.param("Deploy", "s", ["no-such-branch"], None, "org.bluegreen1.Error.UnknownRef",
                 id="unknown-ref"),
    pytest.param("Rollback", "s", ["999999"], None, "org.bluegreen1.Error.NoRollbackTarget",
                 id="unknown-target"),
    pytest.param("GetDeployment", "s", ["../1"], None, "org.bluegreen1.Error.NoSuchDeployment",
                 id="bad-id"),
    pytest.param("DeployWithOptions", "sa{sv}", ["", {"trigger": {"variant": ["s", "refresher"]}}],
                 ["s", "a{sv}"], "org.freedesktop.DBus.Error.InvalidArgs", id="forged-trigger"),
    pytest.param("NotifyPush", "ays", [[1, 2], "sha256=00"], ["ay", "s"], "org.bluegreen1.Error.BadSignature",
                 id="bad-signature"),
])
def test_bad_dbus_calls_get_errors_and_change_nothing(box: Sandbox, app: App, member: str, signature: str,
                                                      body: list[object], types: list[str] | None,
                                                      error: str) -> None:
    before, pid = wait_serving(box), main_pid(box, "bluegreen.service")
    result = dbus_error(box, member, signature, body, types)
    assert result["error"] == error, result
    assert result["message"]
    after = properties(box)
    assert (after["LastDeployment"], after["ActiveRelease"]) == (before["LastDeployment"],
                                                                 before["ActiveRelease"])
    assert main_pid(box, "bluegreen.service") == pid  # the daemon keeps running


@pytest.mark.parametrize("member", ["Deploy", "Rollback", "Refresh"])
def test_unprivileged_callers_may_not_change_anything(box: Sandbox, app: App, member: str) -> None:
    args = [member] if member == "Refresh" else [member, "s", ""]
    result = busctl(box, "call", *MANAGER, *args, check=False, user="nobody")
    assert result.returncode != 0
    assert "Access denied" in result.stderr or "AccessDenied" in result.stderr, result.stderr
    state = busctl(box, "get-property", *MANAGER, "State", user="nobody")
    assert "serving" in state.stdout


def test_concurrent_triggers_from_http_dbus_and_cli_run_one(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    app.commit("Everyone wants to deploy this")
    script = ("for i in 1 2 3; do curl -s -o /dev/null -w 'http %{http_code}\\n' -X POST "
              "--unix-socket /run/bluegreen/api.sock http://localhost/deploy & "
              "busctl --system call org.bluegreen1 /org/bluegreen1 org.bluegreen1.Manager Deploy s '' "
              "2>&1 | sed 's/^/dbus /' & "
              "bluegreenctl deploy --no-wait 2>&1 | sed 's/^/cli /' & done; wait")
    lines = [line for line in box.sh(script).stdout.splitlines() if line.strip()]
    accepted = [line for line in lines if line == "http 202" or line.startswith('dbus s "')
                or (line.startswith("cli ") and line[4:].strip().isdigit())]
    refused = [line for line in lines if line == "http 409" or "is running" in line
               or "being prepared" in line]
    assert len(accepted) == 1 and len(refused) == 8, lines
    current = properties(box)["CurrentDeployment"] or properties(box)["LastDeployment"]
    assert all(f"deployment {current}" in line or "being prepared" in line
               for line in refused if line != "http 409"), lines
    record = wait_deployment(box, current)
    assert record["state"] == "succeeded"
    records = [d for d in json.loads(box.run("bluegreenctl", "history", "--json").stdout)
               if int(d["id"]) > int(before["LastDeployment"])]
    assert [d["id"] for d in records] == [current]  # the history holds exactly one new record


def test_a_broken_config_refuses_to_start_and_never_stops_serving(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    good = box.path(CONFIG).read_text()
    with Load(box, "--fast", "3", "--slow", "1") as load:
        try:
            box.path(CONFIG).write_text(good + '[api]\nlisten = "everywhere"\n')
            result = box.run("systemctl", "restart", "bluegreen.service", check=False)
            assert result.returncode != 0
            time.sleep(2)
            journal = box.journal("-u", "bluegreen.service", "-n", "20", "-o", "cat")
            line_no = len(good.splitlines()) + 2
            assert f"{CONFIG}:{line_no}: api.listen: 'everywhere' is not HOST:PORT" in journal, journal
            status = box.run("systemctl", "show", "-P", "ExecMainStatus", "bluegreen.service").stdout
            assert status.strip() == "78"
            assert box.run("systemctl", "is-active", f"bluegreen-app@{before['ActivePort']}.service"
                           ).stdout.strip() == "active"
        finally:
            box.path(CONFIG).write_text(good)
        box.run("systemctl", "restart", "bluegreen.service")
        after = wait_serving(box)
    assert load.report["failed"] == 0
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])


@pytest.fixture()
def garbage_remote(box: Sandbox, app: App) -> Iterator[None]:
    """The repository URL points at a server that answers anything but git."""
    site = box.path("/srv/garbage/app.git/info")
    site.mkdir(parents=True)
    (site / "refs").write_text("<html>this is not a git repository</html>\n")
    server = box.popen_net(["/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1",
                            "--directory", str(box.path("/srv/garbage")), "7099"])
    configure(box, EXTRA, repository='url = "http://127.0.0.1:7099/app.git"\npoll_interval = 1\n')
    box.run("systemctl", "restart", "bluegreen.service")
    yield
    server.terminate()
    server.wait()
    configure(box, EXTRA)
    box.run("systemctl", "restart", "bluegreen.service")
    assert REPO in box.path(CONFIG).read_text()


def test_a_remote_answering_garbage_backs_off_and_serving_goes_on(box: Sandbox, app: App,
                                                                  garbage_remote: None) -> None:
    before = wait_serving(box)
    with Load(box, "--fast", "2", "--slow", "0"):
        time.sleep(8)
    props = properties(box)
    assert "git ls-remote" in props["RemoteError"], props
    attempts = [line for line in box.journal("-u", "bluegreen.service", "-o", "cat", "--grep",
                                             "cannot read").splitlines() if "(attempt" in line]
    assert 2 <= len(attempts) <= 4  # 1 s, 2 s, 4 s: backing off, not hammering
    assert (props["ActiveRelease"], props["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert http(box, "GET", "/", port=5000).status == 200


TOKEN = "api-token-" + "x" * 24
TOKEN_FILE = "/etc/bluegreen/api-token"


def _reload_api(box: Sandbox) -> None:
    """Apply api.listen and the token (bluegreen-generator), as docs/http-api.md says."""
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "stop", "bluegreen-api.service")
    box.run("systemctl", "restart", "bluegreen-api.socket")


@pytest.fixture()
def api_token(box: Sandbox) -> Iterator[str]:
    box.write(TOKEN_FILE, TOKEN + "\n", mode=0o600)
    _reload_api(box)
    yield TOKEN
    box.run("rm", "-f", TOKEN_FILE)
    _reload_api(box)


def _unchanged(box: Sandbox, before: dict[str, object]) -> None:
    after = properties(box)
    assert after["CurrentDeployment"] == ""
    assert (after["LastDeployment"], after["ActiveRelease"]) == (before["LastDeployment"],
                                                                 before["ActiveRelease"])


def test_changes_over_tcp_need_a_token_even_on_loopback(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    refused = http(box, "POST", "/deploy", "{}")
    assert refused.status == 403 and API_SOCKET in refused.body["message"], refused
    assert http(box, "POST", "/rollback", "{}").status == 403
    assert http(box, "GET", "/status").status == 200  # reading stays open
    _unchanged(box, before)


def test_a_member_of_the_bluegreen_group_deploys_over_the_unix_socket(box: Sandbox, app: App) -> None:
    box.run("useradd", "--no-create-home", "--groups", "bluegreen", "operator-alice")
    wait_serving(box)
    sha = app.commit("Deployed by a member of the bluegreen group")
    response = http(box, "POST", "/deploy", json.dumps({"ref": "main"}), unix=True, user="operator-alice")
    assert response.status == 202, response
    record = wait_deployment(box, response.body["id"])
    assert (record["state"], record["commit"], record["trigger"]) == ("succeeded", sha, "http")
    tcp = http(box, "POST", "/deploy", "{}", user="operator-alice")
    assert tcp.status == 403, tcp  # over TCP the group is no proof: the token is


def test_others_cannot_reach_the_unix_socket(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    for user in ("nobody", "bluegreen-app", "bluegreen-build"):
        response = http(box, "POST", "/deploy", "{}", unix=True, user=user)
        assert response.status == 0, (user, response)  # connect() fails: EACCES
    assert http(box, "GET", "/status", unix=True, user="bluegreen").status == 200
    _unchanged(box, before)


# The app unit's sandbox, as far as it concerns reaching the API.
APP_SANDBOX = ["-p", "User=bluegreen-app", "-p", "Group=bluegreen-app", "-p", "PrivateUsers=yes",
               "-p", "ProtectSystem=strict", "-p", "ProtectHome=yes", "-p", "PrivateTmp=yes",
               "-p", "NoNewPrivileges=yes", "-p", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"]
CALL_THE_API = "; ".join(
    f"curl -s -o /dev/null -w '{what} %{{http_code}}\\n' -X POST {where}" for what, where in (
        ("tcp deploy", "http://127.0.0.1:5001/deploy"),
        ("tcp rollback", "http://127.0.0.1:5001/rollback"),
        ("unix deploy", "--unix-socket /run/bluegreen/api.sock http://localhost/deploy"))) + "; true"
REFUSED = ["tcp deploy 401", "tcp rollback 401", "unix deploy 000"]


def test_an_app_instance_cannot_deploy(box: Sandbox, app: App, api_token: str) -> None:
    before = wait_serving(box)
    out = box.run("systemd-run", "--wait", "--pipe", "--quiet", "--collect", *APP_SANDBOX,
                  "/bin/sh", "-c", CALL_THE_API).stdout
    assert out.split("\n")[:3] == REFUSED, out
    _unchanged(box, before)


def test_a_build_that_calls_the_deploy_endpoint_is_refused(box: Sandbox, app: App, api_token: str) -> None:
    good = box.path(CONFIG).read_text()
    configure(box, settings(0, workers=4, release={"build_command": CALL_THE_API}))
    try:
        box.run("systemctl", "restart", "bluegreen.service")
        before = wait_serving(box)
        app.commit("A build that tries to deploy")
        record = wait_deployment(box, call(box, "Deploy", "s", ""))
        assert record["state"] == "succeeded", (record["failed_step"], record["reason"])
        journal = box.journal(f"DEPLOYMENT_ID={record['id']}", "-o", "cat")
        assert all(line in journal for line in REFUSED), journal
        newer = [d for d in call(box, "ListDeployments", "u", "10")
                 if int(d["id"]) > int(before["LastDeployment"])]
        assert [d["id"] for d in newer] == [record["id"]]  # the build started nothing
    finally:
        box.path(CONFIG).write_text(good)
        box.run("systemctl", "restart", "bluegreen.service")
        wait_serving(box)


def test_with_the_token_changes_over_tcp_are_accepted(box: Sandbox, app: App, api_token: str) -> None:
    before = wait_serving(box)
    assert http(box, "POST", "/deploy", "{}").status == 401
    assert http(box, "POST", "/deploy", "{}", token="wrong").status == 401
    _unchanged(box, before)
    response = http(box, "POST", "/deploy", "{}", token=api_token)
    assert response.status == 202, response
    assert wait_deployment(box, response.body["id"])["trigger"] == "http"


def test_beyond_loopback_changes_need_the_api_token(box: Sandbox, app: App, api_token: str) -> None:
    config = box.path(CONFIG)
    good = config.read_text()
    try:
        config.write_text(good + '[api]\nlisten = "0.0.0.0:5002"\n')
        _reload_api(box)
        assert http(box, "GET", "/status", port=5002).status == 200
        denied = http(box, "POST", "/deploy", "{}", port=5002)
        assert denied.status == 401 and "Bearer" in denied.body["message"]
        assert http(box, "POST", "/deploy", "{}", port=5002, token="wrong").status == 401
        accepted = http(box, "POST", "/deploy", "{}", port=5002, token=api_token)
        assert accepted.status == 202, accepted
        assert wait_deployment(box, accepted.body["id"])["trigger"] == "http"
        assert http(box, "GET", "/status", unix=True).status == 200  # the unix socket stays
    finally:
        config.write_text(good)
        _reload_api(box)
    assert http(box, "POST", "/deploy", "{}").status == 401  # back on loopback: still the token
