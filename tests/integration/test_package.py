"""The .deb: install, configure, start; upgrade under load; remove and purge."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import App, Load, main_pid, public, wait_for_commit, wait_serving
from tests.sandbox import ROOT, Sandbox, build_deb

pytestmark = pytest.mark.integration


# The README's install section, line 2, with the sample app's repository.
SET_REPOSITORY = r"""sed -i 's|^#url = .*|url = "/srv/app.git"|' /etc/bluegreen/bluegreen.toml"""


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    """The sample app's repository, set in the shipped configuration file as the README says."""
    application = App(box)
    application.create()
    readme = (ROOT / "README.md").read_text()
    assert SET_REPOSITORY.replace("/srv/app.git", "https://git.example.com/you/app.git") in readme
    box.sh(SET_REPOSITORY)
    return application


@pytest.fixture(scope="module")
def newer_deb() -> Path:
    """The same sources built as a newer version, to upgrade to."""
    version = subprocess.run(["dpkg-parsechangelog", "-l", "packaging/debian/changelog", "-S", "Version"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    return build_deb(f"{version}+rebuild1")


def active_units(box: Sandbox) -> list[str]:
    out = box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active,activating,"
                  "deactivating,reloading", "bluegreen*").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_lintian_reports_no_errors_or_warnings(deb: Path) -> None:
    result = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout
    assert not [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]


def test_installing_enables_but_deploys_nothing(box: Sandbox, deb: Path) -> None:
    assert box.run("dpkg-query", "-W", "-f=${Status} ${Version}", "bluegreen").stdout.startswith(
        "install ok installed")
    assert box.run("systemctl", "is-enabled", "bluegreen.service").stdout.strip() == "enabled"
    assert box.run("systemctl", "is-active", "bluegreen.service", check=False).stdout.strip() == "inactive"
    assert active_units(box) == ["bluegreen-api.socket"]
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "bluegreen").stdout
    assert "/etc/bluegreen/bluegreen.toml" in conffiles
    files = box.run("dpkg", "-L", "bluegreen").stdout.split()
    for expected in ("/usr/bin/bluegreenctl", "/usr/share/man/man1/bluegreenctl.1.gz",
                     "/usr/share/man/man5/bluegreen.toml.5.gz", "/usr/share/man/man8/bluegreen.8.gz",
                     "/usr/share/dbus-1/system.d/org.bluegreen1.conf",
                     "/usr/lib/sysctl.d/50-bluegreen.conf",
                     "/usr/share/doc/bluegreen/examples/app/app.py",
                     "/usr/lib/systemd/system/bluegreen-app@.service",
                     "/usr/lib/systemd/system/bluegreen-api.service.d/10-hardening.conf",
                     "/usr/lib/systemd/system-generators/bluegreen-generator"):
        assert expected in files
    assert [f for f in files if f.startswith("/lib/")] == []  # all under /usr (DEP17)
    assert box.run("getent", "group", "bluegreen").stdout.startswith("bluegreen:")
    assert box.run("bluegreenctl", "--help").stdout.startswith("usage: bluegreenctl")
    assert box.run("systemd-analyze", "verify", "bluegreen.service", "bluegreen-api.socket",
                   "bluegreen-api.service", "bluegreen-app@1.service", "bluegreen-forward@1.service",
                   check=False).returncode == 0


def test_postinst_sets_tcp_migrate_req_without_procps(box: Sandbox) -> None:
    # sysctl(8) is procps', which the package does not depend on: hide it from the postinst.
    hidden = box.run("sh", "-c", "command -v sysctl", check=False).stdout.strip()
    if hidden:
        box.run("mv", hidden, f"{hidden}.hidden")
    try:
        box.run("sh", "-c", "echo 0 > /proc/sys/net/ipv4/tcp_migrate_req")
        version = box.run("dpkg-query", "-W", "-f=${Version}", "bluegreen").stdout
        box.run("/var/lib/dpkg/info/bluegreen.postinst", "configure", version)
        assert box.run("cat", "/proc/sys/net/ipv4/tcp_migrate_req").stdout.strip() == "1"
    finally:
        if hidden:
            box.run("mv", f"{hidden}.hidden", hidden)


def test_systemctl_start_serves_the_configured_app(box: Sandbox, app: App) -> None:
    box.run("systemctl", "start", "bluegreen.service")
    props = wait_serving(box)
    assert public(box)["version"] == "1"
    assert props["ActiveRelease"] == app.head()
    assert box.run("sysctl", "-n", "net.ipv4.tcp_migrate_req").stdout.strip() == "1"
    entries = [json.loads(line) for line in box.run(
        "journalctl", "--no-pager", "-o", "json", "-u", "bluegreen.service",
        f"DEPLOYMENT_ID={props['LastDeployment']}").stdout.splitlines()]
    messages = [e["MESSAGE"] for e in entries]
    assert any("succeeded" in m for m in messages), messages
    assert {e.get("RELEASE") for e in entries} == {props["ActiveRelease"]}
    assert str(props["ActivePort"]) in {e.get("PORT") for e in entries}


def test_upgrade_under_load_keeps_the_serving_instance(box: Sandbox, app: App, newer_deb: Path) -> None:
    before = wait_serving(box)
    port = before["ActivePort"]
    instance = main_pid(box, f"bluegreen-app@{port}.service")
    forwarder = main_pid(box, f"bluegreen-forward@{port}.service")
    controller = main_pid(box, "bluegreen.service")
    with Load(box, "--fast", "4", "--slow", "2") as load:
        box.install_deb(newer_deb)
        after = wait_serving(box)
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert all(s["outcome"] == "ok" for s in load.report["slow"])
    version = box.run("dpkg-query", "-W", "-f=${Version}", "bluegreen").stdout
    assert version.endswith("+rebuild1")
    assert main_pid(box, f"bluegreen-app@{port}.service") == instance
    assert main_pid(box, f"bluegreen-forward@{port}.service") == forwarder
    assert main_pid(box, "bluegreen.service") != controller
    assert (after["ActivePort"], after["ActiveRelease"]) == (port, before["ActiveRelease"])
    # The restarted controller manages the instance it adopted: the next deploy (the refresher
    # picks up the push) retires it.
    sha = app.commit("First release after the upgrade")
    record = wait_for_commit(box, sha, timeout=40)
    assert record["state"] == "succeeded", record
    assert record["trigger"] == "refresher"
    assert record["previous_port"] == port
    assert box.run("systemctl", "is-active", f"bluegreen-app@{port}.service", check=False
                   ).stdout.strip() == "inactive"


FORWARDER_UNIT = {"socat": "bluegreen-forward@{port}.service",
                  "proxy": "bluegreen-proxy@{port}.service",
                  "haproxy": "bluegreen-haproxy.service",
                  "direct": "bluegreen-app-public@{port}.socket"}


@pytest.mark.parametrize("forwarder", ["socat", "proxy", "haproxy", "direct"])
def test_remove_stops_everything_and_purge_leaves_nothing(box: Sandbox, app: App, deb: Path,
                                                          forwarder: str) -> None:
    if forwarder != "socat":  # installed again after the previous run's purge, with a worker
        box.install_deb(deb)
        box.sh(SET_REPOSITORY)
        config = box.path("/etc/bluegreen/bluegreen.toml")
        config.write_text(f'forwarder = "{forwarder}"\n' + config.read_text()
                          + '[processes]\nticker = "exec sleep 1000"\n')
    box.run("systemctl", "start", "bluegreen.service")
    port = wait_serving(box)["ActivePort"]
    unit = FORWARDER_UNIT[forwarder].format(port=port)
    assert box.run("systemctl", "is-active", unit).stdout.strip() == "active"
    if forwarder != "socat":
        assert f"bluegreen-worker@{port}-ticker.service" in active_units(box)
    box.run("systemctl", "start", "bluegreen-api.service")
    files = [f for f in box.run("dpkg", "-L", "bluegreen").stdout.split() if box.path(f).is_file()]
    assert len(files) > 30
    assert box.exists(f"/run/systemd/system/bluegreen-app@{port}.service.d/50-bluegreen-secrets.conf")
    box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "remove", "-y", "bluegreen")
    assert active_units(box) == []
    # Nor are the drop-ins left that gave the instances and workers their secrets.
    assert box.run("sh", "-c", "echo /run/systemd/system/bluegreen*").stdout.split() == [
        "/run/systemd/system/bluegreen*"]
    listening = box.run("ss", "-Hltn").stdout
    assert ":5000 " not in listening and ":5001 " not in listening, listening
    assert f":{port} " not in listening, listening  # the instance's socket is closed too
    assert box.path("/etc/bluegreen/bluegreen.toml").exists()  # a conffile stays until purge
    assert box.exists("/var/lib/bluegreen/data")  # the app's data stays until purge
    box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "bluegreen")
    left = [f for f in files if box.path(f).exists()]
    assert left == []
    for directory in ("/var/lib/bluegreen", "/etc/bluegreen", "/run/bluegreen",
                      "/usr/lib/python3/dist-packages/bluegreen"):
        assert not box.exists(directory), directory
    assert box.run("dpkg-query", "-W", "bluegreen", check=False).returncode != 0
