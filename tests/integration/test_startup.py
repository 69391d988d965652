"""Start-up: the controller is ready once it has adopted what runs; a slow remote holds up only
the deployment that needs it."""

from __future__ import annotations

import time

import pytest

from tests.integration.helpers import App, configure, http, properties, public, settings, wait_serving
from tests.sandbox import ROOT, Sandbox

pytestmark = pytest.mark.integration

PORT = 7097
START_TIMEOUT = 10  # the unit's TimeoutStartSec= here: systemd's default (90 s) makes a slow test
HANG = 15.0  # longer than the start timeout


@pytest.fixture(scope="module")
def app(box: Sandbox) -> App:
    box.write("/etc/systemd/system/bluegreen.service.d/start-timeout.conf",
              f"[Service]\nTimeoutStartSec={START_TIMEOUT}\n")
    box.run("systemctl", "daemon-reload")
    application = App(box)
    application.create()
    return application


def test_a_remote_that_hangs_at_the_first_start_holds_up_no_start(box: Sandbox, app: App) -> None:
    server = box.popen_net(["/usr/bin/python3", str(ROOT / "tests/githttp.py"), str(box.path("/srv")),
                            str(PORT)], env={"GITHTTP_HANG": f"{HANG:g}"})
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        hang_ends = time.monotonic() + HANG
        configure(box, settings(0),
                  repository=f'url = "http://127.0.0.1:{PORT}/app.git"\nwatch = false\n')
        box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
        # Ready (Type=notify: systemctl start waited for READY=1) while the remote still hangs.
        assert time.monotonic() < hang_ends
        assert box.run("systemctl", "is-active", "bluegreen.service").stdout.strip() == "active"
        status = http(box, "GET", "/status")
        assert status.status == 200, status
        assert status.body["release"] is None
        assert properties(box)["State"] in ("starting", "deploying")  # the deployment waits for git
        assert time.monotonic() < hang_ends
        props = wait_serving(box, timeout=HANG + 120)
        assert props["ActiveRelease"] == app.head()
        assert public(box)["release"] == app.head()
        restarts = box.run("systemctl", "show", "-P", "NRestarts", "bluegreen.service").stdout
        assert restarts.strip() == "0"
    finally:
        server.terminate()
        server.wait()
