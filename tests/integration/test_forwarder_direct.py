"""The zero-downtime and keep-alive tests (forwarder_suite.py) with forwarder = "direct": no
forwarder at all, each instance listens on the public port, and the SO_REUSEPORT group's
steering program is the switch. And the property that makes it "direct": nobody but the
instances (and systemd, which holds their listeners) has the public port."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.integration.forwarder_suite import ForwarderSuite, serve, step_time
from tests.integration.helpers import (
    App,
    Load,
    call,
    configure,
    deploy_new_release,
    public,
    settings,
    wait_serving,
)
from tests.integration.test_apps import STAGING_FILE, STAGING_PORT, deploy, instances_of, wait_state
from tests.integration.test_front import ACME, BLOG, PEBBLE, HttpsLoad, curl, start_pebble, wait
from tests.integration.test_instances import AFTER_KILL, CLIENTS, failed_when_killed
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration


def holders(box: Sandbox, states: str, port: int = 5000) -> dict[int, str]:
    """The processes holding sockets of ``port`` in ``states`` (ss), each with its cgroup."""
    out = box.run("ss", "-Htnp", "state", states, f"sport = :{port}").stdout
    pids = {int(pid) for pid in re.findall(r"pid=(\d+)", out)}
    return {pid: box.run("cat", f"/proc/{pid}/cgroup").stdout.strip().rsplit("/", 1)[-1]
            for pid in pids}


def instances_taking(box: Sandbox) -> set[str]:
    """The instances a few seconds of load on the public port reach."""
    with Load(box, "--fast", "4", "--slow", "0") as load:
        time.sleep(3.0)
    return {key.partition("@")[2] for key in load.report["instances"]}


class TestDirect(ForwarderSuite):
    FORWARDER = "direct"

    def test_a_killed_instance_of_two_costs_only_the_requests_it_was_serving(
            self, box: Sandbox, sample: App) -> None:
        """One of two instances SIGKILLed under load: new connections go to the other one as
        soon as systemd has seen the death (its ExecStopPost=), those already queued on the
        dead one's listener wait there for the restarted gunicorn (systemd holds it)."""
        serve(box, sample, settings(1, forwarder=self.FORWARDER, workers=4,
                                    app={"instances": 2}), threads=False)
        two = sorted(port for port, state, _release in call(box, "ListInstances") if state == "active")
        assert len(two) == 2, two
        assert instances_taking(box) == {str(port) for port in two}
        report = failed_when_killed(box, two[1])
        print(f"\nfailed requests when one of two direct instances is SIGKILLed under load "
              f"({AFTER_KILL:g} s after the kill): {report['failed']} of {report['requests']} "
              f"{report['failures_by_kind']}, longest gap between successes "
              f"{report['longest_gap']:.2f} s")
        assert report["failed"] <= CLIENTS, report["failures"]
        deadline = time.monotonic() + 30  # back on the public port once healthy
        while instances_taking(box) != {str(port) for port in two}:
            assert time.monotonic() < deadline, "the restarted instance gets no connection"

    def test_nobody_but_the_instances_holds_the_public_port(self, box: Sandbox, serving: App) -> None:
        port = wait_serving(box)["ActivePort"]
        assert public(box)["version"] == str(serving.version)
        instance = f"bluegreen-app@{port}.service"
        listening = holders(box, "listening")
        print(f"\nlisteners of port 5000 held by {listening}")
        assert 1 in listening  # systemd: the instance's socket unit keeps it across restarts
        assert instance in listening.values()
        assert all(pid == 1 or cgroup == instance for pid, cgroup in listening.items()), listening
        # A connection to the public port ends in the instance itself (the client runs in the
        # container's network only: its side of the connection has no process in there).
        script = ("import socket, time\n"
                  "s = socket.create_connection(('127.0.0.1', 5000))\n"
                  "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); s.recv(65536)\n"
                  "print('open', flush=True); time.sleep(3)\n")
        client = box.popen_net(["/usr/bin/python3", "-c", script])
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "open"
            connected = holders(box, "established")
            print(f"connections to port 5000 held by {connected}")
            assert connected and all(cgroup == instance for cgroup in connected.values()), connected
        finally:
            client.wait(timeout=10)

    def test_two_apps_each_switch_their_own_public_port(self, box: Sandbox, sample: App) -> None:
        """A second app, also direct, on its own public port: a deploy of each under load on
        both ports fails no request, each port reaches its own app only, and its listeners are
        its own instances' (and systemd's, for them) alone."""
        serve(box, sample, settings(1, forwarder=self.FORWARDER, workers=4), threads=False)
        staging = App(box)
        staging.work, staging.bare = box.path("/srv/staging-work"), box.path("/srv/staging.git")
        staging.create()
        staging.commit("Staging", {"VERSION": "staging-1\n"})
        box.write(STAGING_FILE, f'forwarder = "direct"\npost_switch_watch = 1\n[repository]\n'
                  f'url = "/srv/staging.git"\nwatch = false\n[ports]\npublic = {STAGING_PORT}\n'
                  '[app]\nworkers = 4\n[health]\ninterval = 0.2\n')
        try:
            box.run("systemctl", "reload", "bluegreen.service")
            wait_state(box, "staging")
            with Load(box, "--port", "5000", "--fast", "2", "--slow", "0") as default_load, \
                    Load(box, "--port", str(STAGING_PORT), "--fast", "2", "--slow", "0") as staging_load:
                deploy_new_release(box, sample, f"Release {sample.version + 1}")
                staging.commit("Staging 2", {"VERSION": "staging-2\n"})
                assert deploy(box, "staging")["state"] == "succeeded"
            for app, port in (("default", 5000), ("staging", STAGING_PORT)):
                listening = holders(box, "listening", port)
                print(f"listeners of port {port} held by {listening}")
                own = {f"bluegreen-app@{instance}.service" for instance in instances_of(box, app)}
                assert own and own <= set(listening.values()), (own, listening)
                assert all(pid == 1 or cgroup in own for pid, cgroup in listening.items()), listening
        finally:
            box.run("rm", "-f", STAGING_FILE)
            box.run("systemctl", "reload", "bluegreen.service")
        reports = {5000: default_load.report, STAGING_PORT: staging_load.report}
        for port, report in reports.items():
            print(f"\nport {port}: {report['requests']} requests, {report['failed']} failed, "
                  f"releases seen {report['versions']}")
            assert report["failed"] == 0, (port, report["failures_by_kind"], report["failures"][:10])
        assert set(reports[5000]["versions"]) == {str(sample.version - 1), str(sample.version)}
        assert set(reports[STAGING_PORT]["versions"]) == {"staging-1", "staging-2"}

    def test_a_public_address_binds_the_instances_there_alone(self, box: Sandbox, sample: App) -> None:
        """ports.public_address names one address, IPv4 or IPv6: every public listener is
        bound there and nowhere else, and a deploy under load there fails no request."""
        for address, other in (("127.0.0.1", "::1"), ("::1", "127.0.0.1")):
            serve(box, sample, settings(1, forwarder=self.FORWARDER, workers=4,
                                        ports={"public_address": address}), threads=False)
            with Load(box, "--host", address, "--fast", "4", "--slow", "1",
                      "--slow-seconds", "2") as load:
                record = deploy_new_release(box, sample, f"Release {sample.version + 1}")
            report = load.report
            bound = sorted(set(box.run("ss", "-Hltn", "sport = :5000").stdout.split()[3::5]))
            port = record["port"]
            print(f"\n{address}: listeners of port 5000 on {bound}; {report['requests']} requests, "
                  f"{report['failed']} failed, releases seen {report['versions']}")
            assert bound == [f"[{address}]:5000" if ":" in address else f"{address}:5000"], bound
            listening = holders(box, "listening")
            assert all(pid == 1 or cgroup == f"bluegreen-app@{port}.service"
                       for pid, cgroup in listening.items()), listening
            assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
            assert set(report["versions"]) == {str(sample.version - 1), str(sample.version)}
            refused = box.net("curl", "-sS", "-o", "/dev/null", "-g",
                              f"http://{f'[{other}]' if ':' in other else other}:5000/", check=False)
            assert refused.returncode == 7, refused  # nothing listens on the other address

    def test_gthread_instances_share_max_connections(self, box: Sandbox, serving: App) -> None:
        """No forwarder counts connections: the instance's gunicorn is given its workers' share
        of ports.max_connections (1024 over 2 gthread workers)."""
        port = wait_serving(box)["ActivePort"]
        pid = int(box.run("systemctl", "show", "-P", "MainPID", f"bluegreen-app@{port}.service").stdout)
        environ = box.run("cat", f"/proc/{pid}/environ").stdout.split("\0")
        assert "BLUEGREEN_WORKER_CONNECTIONS=512" in environ, [v for v in environ if "WORKER" in v]

    def test_no_new_connection_reaches_an_old_instance_while_the_old_ones_stop(
            self, box: Sandbox, sample: App, tmp_path: Path) -> None:
        """Two instances a release: once the drain is over, the old ones get no new connection,
        also while they stop. When an old listener leaves the group the kernel moves the last
        one into its slot; the program must stay right before and after that move. Two
        deploys, then one that lowers app.instances to 1: the one new listener, the group's
        last, moves into the slot of the first old one to leave."""
        serve(box, sample, settings(1, forwarder=self.FORWARDER, workers=4,
                                    app={"instances": 2}), threads=False)
        answers = tmp_path / "answers.json"
        records = []
        with Load(box, "--fast", "4", "--slow", "0", "--answers", str(answers)) as load:
            for instances in (2, 2, 1):
                if instances == 1:
                    configure(box, settings(1, forwarder=self.FORWARDER, workers=4,
                                            app={"instances": 1}))
                    box.run("systemctl", "reload", "bluegreen.service")
                records.append(deploy_new_release(box, sample, f"Release {sample.version + 1}"))
        answered = json.loads(answers.read_text())
        report = load.report
        late = []  # by deploy: when new connections reached the old release after its drain
        for number, record in enumerate(records):
            old = str(sample.version - len(records) + number)
            drained = next(end for step, _start, end in record["steps"] if step == "drain")
            stopping = step_time(record, "stop-old")
            late.append([round(start - stopping, 3) for start, version in answered
                         if version == old and start > drained])
        print(f"\n{report['requests']} requests, {report['failed']} failed; new connections "
              f"answered by the old release after its drain, by deploy (seconds from stop-old): "
              f"{[len(each) for each in late]} {[each[:5] for each in late]}")
        assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
        assert late[:2] == [[], []]  # the program names the same listeners before and after
        # The lone new listener's move is followed within a millisecond of it, not at once.
        assert len(late[2]) <= 2, late[2]
        assert len(instances_of(box, "default")) == 1
        followed = box.journal("-u", "bluegreen-app@*", "--grep", "its listeners left, then")
        assert followed.count("left, then") >= 5, followed  # ExecStop= had gunicorn's pid

    def test_the_https_front_reaches_direct_instances_through_a_deploy(
            self, box: Sandbox, sample: App) -> None:
        """The front (Caddy, certificates from pebble) passes a domain on to the public port,
        which the instances hold themselves: a deploy under HTTPS load fails no request."""
        start_pebble(box)
        box.write("/etc/hosts", f"127.0.0.1 localhost {BLOG}\n::1 localhost\n")
        serve(box, sample, settings(1, forwarder=self.FORWARDER, workers=4, app={"domains": [BLOG]},
                                    front={"email": "ops@example.com", "acme_ca": ACME,
                                           "acme_ca_root": f"{PEBBLE}/cert.pem"}), threads=False)
        wait(lambda: curl(box, f"https://{BLOG}/", "-f", check=False).returncode == 0,
             f"a certificate for {BLOG}", 60)
        with HttpsLoad(box) as load:
            deploy_new_release(box, sample, f"Release {sample.version + 1} behind the front")
        print(f"\nHTTPS load on {BLOG} during a deploy of direct instances: {load.summary()}")
        load.assert_busy_and_flawless()
        assert json.loads(curl(box, f"https://{BLOG}/").stdout)["version"] == str(sample.version)
        bound = sorted(set(box.run("ss", "-Hltn", "sport = :5000").stdout.split()[3::5]))
        assert bound == ["127.0.0.1:5000"], bound  # where only the front reaches it
