"""The zero-downtime and keep-alive tests (forwarder_suite.py) with forwarder = "direct": no
forwarder at all, each instance listens on the public port, and the SO_REUSEPORT group's
steering program is the switch. And the property that makes it "direct": nobody but the
instances (and systemd, which holds their listeners) has the public port."""

from __future__ import annotations

import re

import pytest

from tests.integration.forwarder_suite import ForwarderSuite
from tests.integration.helpers import App, public, wait_serving
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration


def holders(box: Sandbox, states: str) -> dict[int, str]:
    """The processes holding sockets of port 5000 in ``states`` (ss), each with its cgroup."""
    out = box.run("ss", "-Htnp", "state", states, "sport = :5000").stdout
    pids = {int(pid) for pid in re.findall(r"pid=(\d+)", out)}
    return {pid: box.run("cat", f"/proc/{pid}/cgroup").stdout.strip().rsplit("/", 1)[-1]
            for pid in pids}


class TestDirect(ForwarderSuite):
    FORWARDER = "direct"

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
