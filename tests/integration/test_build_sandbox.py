"""Builds are sandboxed: each runs in a transient unit whose cgroup dies with it, bounded in
tasks, unable to reach back into the controller, and the tree it leaves is re-owned without
following a link. All of a build's output is in the journal under its deployment.

The repository's build.sh is the build (``release.build_command = "sh build.sh"``); each test
commits its own.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    App,
    Load,
    configure,
    http,
    properties,
    public,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration

TIMEOUT = 30
# Where the controller itself may write (ProtectSystem=strict keeps it out of /etc anyway).
VICTIM = "/var/lib/bluegreen/victim"

# A daemon, the way a build would leave one behind: fork, setsid, fork again (and, if asked,
# ignore SIGTERM); then try to move itself into the controller's cgroup (the cgroup.procs files
# named on its command line).
DAEMON = """\
import os, signal, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for procs in sys.argv[3:]:
    try:
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))
        print("escaped into", procs, flush=True)
    except OSError as exc:
        print("stayed in its cgroup:", procs, exc.strerror, flush=True)
time.sleep(3600)
"""

# Every process forks, again and again, and never gives up (a shell's bomb burns itself out
# once its forks fail; this one stays at whatever bound it meets).
BOMB = """\
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.2)
"""

# Swaps the directory sub/ for a link into /etc and back, for as long as it lives.
RACER = f"""\
import os, shutil, sys
if os.fork():
    sys.exit(0)
os.setsid()
while True:
    try:
        shutil.rmtree("sub")
    except OSError:
        pass
    try:
        os.symlink("{VICTIM}", "sub")
        os.unlink("sub")
        os.mkdir("sub")
        for n in range(20):
            open(f"sub/{{n}}", "w").close()
    except OSError:
        pass
"""


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    application = App(box)
    application.create()
    application.commit("A build that does nothing", {"build.sh": "echo nothing to build\n"})
    configure(box, f'[release]\nbuild_command = "sh build.sh"\ntimeout = {TIMEOUT}\n')
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    wait_serving(box)
    return application


def deploy(box: Sandbox, timeout: float = 180) -> dict[str, Any]:
    deployment_id = box.run("bluegreenctl", "deploy", "--no-wait").stdout.strip()
    return wait_deployment(box, deployment_id, timeout=timeout)


def controller_cgroup(box: Sandbox) -> list[str]:
    """The cgroup.procs files of the controller's cgroup (pure cgroup2 host or hybrid)."""
    group = box.run("systemctl", "show", "-P", "ControlGroup", "bluegreen.service").stdout.strip()
    assert group
    return [f"/sys/fs/cgroup/unified{group}/cgroup.procs", f"/sys/fs/cgroup{group}/cgroup.procs"]


@pytest.mark.parametrize("daemon", ["polite", "stubborn"])
def test_nothing_a_build_leaves_running_survives_it(box: Sandbox, app: App, daemon: str) -> None:
    """A polite daemon ends at SIGTERM and the build succeeds; a stubborn one is killed
    STOP_TIMEOUT (10 s) later and fails the build, saying so."""
    marker = f"leftover-{time.monotonic_ns()}"
    procs = controller_cgroup(box)
    app.commit(f"A build that leaves a {daemon} daemon", {
        "daemon.py": DAEMON,
        "build.sh": f"python3 daemon.py {marker} {daemon} {' '.join(procs)}\nsleep 1\n"
                    "echo build done\n"})
    record = deploy(box)
    if daemon == "polite":
        assert record["state"] == "succeeded", record
    else:
        assert (record["state"], record["failed_step"]) == ("failed", "verify"), record
        assert ("release.build_command failed (it left processes behind that ignored SIGTERM "
                "for 10 s)") in record["reason"], record
    logs = box.run("bluegreenctl", "logs", str(record["id"])).stdout
    assert "stayed in its cgroup" in logs, logs  # the daemon did run, and tried
    assert "escaped into" not in logs, logs
    assert marker not in box.run("ps", "-eo", "args", "--no-headers").stdout
    assert not box.run("pgrep", "-u", "bluegreen-build", check=False).stdout.strip()
    # (0: a process of another container on this host's shared hierarchy.)
    inside = [pid for pid in next(box.run("cat", p).stdout.split() for p in procs if box.exists(p))
              if pid != "0"]
    users = box.run("ps", "-o", "user=", "-p", ",".join(inside)).stdout.split()
    assert set(users) == {"root"}, (inside, users)
    leftovers = box.run("systemctl", "list-units", "--all", "--plain", "--no-legend",
                        "bluegreen-build-*", "bluegreen-check-*").stdout
    assert not leftovers.strip(), leftovers  # collected, failed or not


# With the stress tests, which run one at a time: the test containers share the host's kernel
# and bluegreen-build's uid, and LimitNPROC= counts that uid's processes host-wide, so a bomb
# held at 512 here would starve a build that another container runs at the same moment.
@pytest.mark.stress
def test_a_fork_bomb_in_a_build_is_contained(box: Sandbox, app: App) -> None:
    before = wait_serving(box)
    app.commit("A build that fork-bombs", {"bomb.py": BOMB, "build.sh": "exec python3 bomb.py\n"})
    most = 0
    answers = []
    with Load(box, "--fast", "2", "--slow", "1") as load:
        deployment_id = box.run("bluegreenctl", "deploy", "--no-wait").stdout.strip()
        while True:
            status = http(box, "GET", "/status")
            answers.append(status.status)
            tasks = box.run("ps", "-L", "-u", "bluegreen-build", "--no-headers", check=False)
            most = max(most, len(tasks.stdout.splitlines()))
            if http(box, "GET", f"/deployments/{deployment_id}").body.get("state") != "running":
                break
            time.sleep(0.5)
        record = wait_deployment(box, deployment_id)
        after = http(box, "GET", "/status")
    print(f"\nfork bomb: at most {most} tasks of bluegreen-build; /status answered "
          f"{answers.count(200)} of {len(answers)} times during the build; "
          f"load: {load.report['requests']} requests, {load.report['failed']} failed")
    assert set(answers) == {200} and after.status == 200, answers
    assert 100 < most <= 520  # a real bomb, held at TasksMax=/LimitNPROC= (512)
    assert (record["state"], record["failed_step"]) == ("failed", "verify"), record
    assert f"release.build_command failed (timed out after {TIMEOUT} s)" in record["reason"], record
    assert load.report["failed"] == 0, load.report["failures_by_kind"]
    assert properties(box)["ActiveRelease"] == before["ActiveRelease"]
    assert public(box)["release"] == before["ActiveRelease"]
    assert not box.run("pgrep", "-u", "bluegreen-build", check=False).stdout.strip()


def owners(box: Sandbox, *paths: str) -> str:
    return box.run("stat", "-c", "%u:%g %a %n", *paths).stdout


def test_a_build_racing_symlinks_into_its_tree_chowns_nothing_outside(box: Sandbox, app: App) -> None:
    # The files the build's sub/ holds, by the same names: a walk that descends into sub/
    # while it is a link re-owns these.
    box.sh(f"mkdir -p {VICTIM} && cd {VICTIM} && echo secret > file && touch $(seq 0 19) && "
           f"chown -R nobody:nogroup {VICTIM} && chmod 0600 file")
    watched = [VICTIM, f"{VICTIM}/file", *(f"{VICTIM}/{n}" for n in range(20)), "/etc/shadow",
               "/etc/passwd", "/var/lib/bluegreen/bluegreen.db"]
    before = owners(box, *watched)
    # Links in the commit itself, and links the build makes and swaps while it runs.
    (app.work / "links").mkdir(exist_ok=True)
    for name, target in (("file", f"{VICTIM}/file"), ("dir", VICTIM), ("shadow", "/etc/shadow")):
        link = app.work / "links" / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    app.commit("A build that races symlinks", {
        "racer.py": RACER,
        "build.sh": ("set -e\nmkdir -p many && for d in $(seq 100); do mkdir -p many/$d/x && "
                     f"ln -s {VICTIM}/file many/$d/link && ln -s {VICTIM} many/$d/x/dir; done\n"
                     "for n in 1 2 3 4; do python3 racer.py; done\nsleep 2\necho build done\n")})
    record = deploy(box)
    assert record["state"] == "succeeded", record
    assert owners(box, *watched) == before
    release = f"/var/lib/bluegreen/releases/{record['commit']}"
    tree = box.run("find", release, "-printf", "%u %y %p\n").stdout
    assert tree.count("\n") > 300 and re.search(r" l .*/links/file", tree), tree[-2000:]
    assert {line.split()[0] for line in tree.splitlines()} == {"root"}, tree[-2000:]


def test_all_of_a_builds_output_is_in_its_deployment_log(box: Sandbox, app: App) -> None:
    app.commit("A talkative build", {
        "build.sh": "for n in $(seq 1 200); do echo \"build line $n of 200\"; done\n"})
    record = deploy(box)
    assert record["state"] == "succeeded", record
    logs = box.run("bluegreenctl", "logs", str(record["id"])).stdout
    missing = [n for n in range(1, 201) if f"build line {n} of 200\n" not in logs]
    assert not missing, (missing, logs[-3000:])
    journal = box.journal(f"DEPLOYMENT_ID={record['id']}", "-o", "cat")
    assert journal.count(" of 200\n") == 200
