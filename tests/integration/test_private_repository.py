"""A private repository over http with a token, and the push webhook.

The token and the webhook secret are systemd credentials (LoadCredential= in a drop-in); the
token must never show in a process's argv, the journal, the records or the APIs' output.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.helpers import (
    App,
    call,
    http,
    main_pid,
    properties,
    settings,
    wait_for_commit,
    wait_serving,
)
from tests.sandbox import ROOT, Sandbox

pytestmark = pytest.mark.integration

TOKEN = "ghp_" + "S3cr3tT0ken" * 3
WRONG = "ghp_" + "wrong" * 6
SECRET = "hook-secret-0123456789"
PORT = 7070
DROP_IN = """[Service]
LoadCredential=github-token:/etc/bluegreen/github-token
LoadCredential=webhook-secret:/etc/bluegreen/webhook-secret
"""


def forms(secret: str) -> list[str]:
    return [secret, base64.b64encode(f"x-access-token:{secret}".encode()).decode()]


@pytest.fixture(scope="module")
def server(box: Sandbox) -> Iterator[subprocess.Popen[str]]:
    process = box.popen_net(["/usr/bin/python3", str(ROOT / "tests/githttp.py"), str(box.path("/srv")),
                             str(PORT)], env={"GITHTTP_TOKEN": TOKEN})
    assert process.stdout is not None and process.stdout.readline().strip() == "listening"
    yield process
    process.terminate()
    process.wait()


@pytest.fixture(scope="module")
def app(box: Sandbox, server: subprocess.Popen[str]) -> App:
    application = App(box)
    application.create()
    box.write("/etc/bluegreen/bluegreen.toml",
              settings(1) + f'[repository]\nurl = "http://127.0.0.1:{PORT}/app.git"\npoll_interval = 600\n')
    box.write("/etc/systemd/system/bluegreen.service.d/credentials.conf", DROP_IN)
    box.write("/etc/bluegreen/github-token", WRONG + "\n", mode=0o600)
    box.write("/etc/bluegreen/webhook-secret", SECRET + "\n", mode=0o600)
    box.run("systemctl", "daemon-reload")
    return application


def post_hook(box: Sandbox, payload: str, signature: str) -> str:
    """POST /hooks/push with a signature header; return the HTTP status."""
    return subprocess.run(
        ["nsenter", "-t", str(box.leader), "-n", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "-X", "POST", "-H", "Content-Type: application/json", "-H", f"X-Hub-Signature-256: {signature}",
         "--data-binary", payload, "http://127.0.0.1:5001/hooks/push"],
        capture_output=True, text=True, check=True).stdout


def test_a_wrong_token_is_reported_without_showing_it(box: Sandbox, app: App) -> None:
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    deadline = time.monotonic() + 20
    while not properties(box)["RemoteError"] and time.monotonic() < deadline:
        time.sleep(0.2)
    props = properties(box)
    assert props["State"] == "idle"
    assert "could not read Username" in props["RemoteError"] or "401" in props["RemoteError"], props
    journal = box.journal("-u", "bluegreen.service", "-o", "cat")
    assert "no deployment could start" in journal
    for secret in forms(WRONG):
        assert secret not in journal and secret not in props["RemoteError"]


def test_the_right_token_serves_and_never_shows(box: Sandbox, app: App) -> None:
    box.write("/etc/bluegreen/github-token", TOKEN + "\n", mode=0o600)
    box.run("systemctl", "restart", "bluegreen.service")
    props = wait_serving(box)
    assert props["ActiveRelease"] == app.head()
    # While the refresher talks to the server again and again, no process shows the token.
    processes = []
    for _ in range(30):
        call(box, "Refresh")
        processes.append(box.run("ps", "-eo", "args", "--no-headers").stdout)
        time.sleep(0.05)
    seen = "\n".join(processes)
    assert "git" in seen  # the sampling did catch git at work
    sha = app.commit("A private release")
    call(box, "Refresh")
    record = wait_for_commit(box, sha)
    assert record["state"] == "succeeded", record
    instance = main_pid(box, f"bluegreen-app@{record['port']}.service")
    places = {
        "ps": seen,
        "journal": box.run("journalctl", "--no-pager", "-o", "export").stdout,
        "history": json.dumps(call(box, "ListDeployments", "u", "100")),
        "properties": json.dumps(properties(box)),
        "http": "".join(json.dumps(http(box, "GET", path).body)
                        for path in ("/", "/status", "/history", "/health")),
        "instance environment": box.run("cat", f"/proc/{instance}/environ").stdout,
        "instance settings": box.run("cat", f"/run/bluegreen/instances/{record['port']}.env").stdout,
    }
    for place, text in places.items():
        assert text, place
        for secret in forms(TOKEN):
            assert secret not in text, f"the token shows in the {place}"


def test_a_signed_push_webhook_deploys_at_once(box: Sandbox, app: App) -> None:
    wait_serving(box)
    sha = app.commit("Announced by a webhook")
    payload = json.dumps({"ref": "refs/heads/main", "after": sha})
    signature = "sha256=" + hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).hexdigest()
    bad = http(box, "POST", "/hooks/push", payload)
    assert bad.status == 401 and "X-Hub-Signature-256" in bad.body["message"]
    time.sleep(2)
    assert not [d for d in call(box, "ListDeployments", "u", "5") if d["commit"] == sha]
    assert post_hook(box, payload, "sha256=" + "0" * 64) == "401"
    hooked = time.monotonic()
    assert post_hook(box, payload, signature) == "202"
    record = wait_for_commit(box, sha, timeout=30)
    assert record["state"] == "succeeded" and record["trigger"] == "refresher"
    assert time.monotonic() - hooked < 30  # well before the next poll, 600 s away
