"""A repository over ssh: a deploy key (the credential ssh-key) and a pinned host key
(repository.ssh_known_hosts), against an sshd in the container that serves the repository to
the user git through git-shell.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.helpers import (
    REPO,
    App,
    call,
    http,
    properties,
    public,
    settings,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

PORT = 2222
URL = f"ssh://git@127.0.0.1:{PORT}{REPO}"
SSHD_CONFIG = f"""\
Port {PORT}
ListenAddress 127.0.0.1
HostKey /etc/ssh-test/host_key
AuthorizedKeysFile /etc/ssh-test/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
"""
DROP_IN = "[Service]\nLoadCredential=ssh-key:/etc/bluegreen/ssh-key\n"


def keygen(box: Sandbox, path: str) -> str:
    """A new ed25519 key pair at ``path``; returns the public key."""
    box.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path, "-f", path)
    return box.run("cat", f"{path}.pub").stdout.strip()


def configure_ssh(box: Sandbox, pinned: str) -> None:
    box.write("/etc/bluegreen/bluegreen.toml",
              settings(1) + f'[repository]\nurl = "{URL}"\nwatch = false\n'
              f'ssh_known_hosts = "[127.0.0.1]:{PORT} {pinned}"\n')


@pytest.fixture(scope="module")
def host_key(box: Sandbox) -> str:
    """sshd on 127.0.0.1:2222 letting the deploy key in as git (git-shell); its host key."""
    box.run("mkdir", "-p", "/etc/ssh-test")
    host = keygen(box, "/etc/ssh-test/host_key")
    deploy_key = keygen(box, "/etc/bluegreen/ssh-key")
    box.write("/etc/ssh-test/authorized_keys", deploy_key + "\n")
    box.write("/etc/ssh-test/sshd_config", SSHD_CONFIG)
    box.sh("useradd --system --create-home --home-dir /home/git --shell /usr/bin/git-shell git"
           " && usermod -p '*' git"  # no password, but not locked: sshd lets the key in
           " && printf '[safe]\\n\\tdirectory = *\\n' > /home/git/.gitconfig")
    box.run("systemd-run", "--unit=test-sshd", "--property=RuntimeDirectory=sshd",
            "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh-test/sshd_config")
    box.write("/etc/systemd/system/bluegreen.service.d/credentials.conf", DROP_IN)
    box.run("systemctl", "daemon-reload")
    return host


@pytest.fixture(scope="module")
def app(box: Sandbox, host_key: str) -> App:
    application = App(box)
    application.create()
    configure_ssh(box, host_key)
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    return application


def test_a_deploy_over_ssh_uses_the_key_and_the_pinned_host_key(box: Sandbox, app: App) -> None:
    props = wait_serving(box)
    assert props["ActiveRelease"] == app.head(), props
    sha = app.commit("Over ssh")
    record = wait_deployment(box, call(box, "Deploy", "s", ""))
    assert (record["state"], record["commit"]) == ("succeeded", sha), record
    assert public(box)["release"] == sha
    sshd = box.journal("-u", "test-sshd", "-o", "cat")
    assert "Accepted publickey for git" in sshd, sshd
    assert not box.run("find", "/root", "-newer", "/etc/ssh-test/sshd_config").stdout  # untouched


def test_a_wrong_host_key_fails_clearly_and_changes_nothing(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    records = len(call(box, "ListDeployments", "u", "100"))
    configure_ssh(box, keygen(box, "/srv/impostor_key"))
    box.run("systemctl", "restart", "bluegreen.service")
    wait_serving(box)
    sha = app.commit("Never fetched: the host's key is not the pinned one")
    result = box.run("bluegreenctl", "deploy", check=False)
    print(f"\nbluegreenctl deploy exited {result.returncode}: {result.stderr.strip()}")
    assert result.returncode != 0
    assert "Host key verification failed" in result.stderr, result.stdout + result.stderr
    assert "repository.ssh_known_hosts" in result.stderr
    after = properties(box)
    assert (after["ActiveRelease"], after["ActivePort"]) == (before["ActiveRelease"], before["ActivePort"])
    assert public(box)["release"] == before["ActiveRelease"]
    assert len(call(box, "ListDeployments", "u", "100")) == records
    mirror = box.path("/var/lib/bluegreen/repository.git")
    assert subprocess.run(["git", "cat-file", "-e", sha], cwd=mirror, capture_output=True).returncode
    assert not box.run("find", "/root", "-newer", "/etc/ssh-test/sshd_config").stdout  # untouched


def test_the_key_never_shows(box: Sandbox, app: App) -> None:
    key = box.run("cat", "/etc/bluegreen/ssh-key").stdout
    body = [line for line in key.splitlines() if line and "PRIVATE KEY" not in line]
    assert body
    places = {
        "journal": box.run("journalctl", "--no-pager", "-o", "export").stdout,
        "properties": json.dumps(properties(box)),
        "history": json.dumps(call(box, "ListDeployments", "u", "100")),
        "http": "".join(json.dumps(http(box, "GET", path).body) for path in ("/", "/status", "/history")),
        "status": box.run("bluegreenctl", "status", check=False).stdout,
        "ps": box.run("ps", "-eo", "args", "--no-headers").stdout,
    }
    for place, text in places.items():
        assert text, place
        for line in body:
            assert line not in text, f"the key shows in the {place}"
