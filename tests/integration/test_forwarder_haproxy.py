"""The zero-downtime and keep-alive tests (forwarder_suite.py) with HAProxy (forwarder =
"haproxy"): there, a client moves at its next request on the connection it has, which no switch
closes."""

from __future__ import annotations

import pytest

from tests.integration.forwarder_suite import Clients, ForwarderSuite
from tests.integration.helpers import App, call, wait_deployment
from tests.sandbox import Sandbox

pytestmark = pytest.mark.integration


class TestHaproxy(ForwarderSuite):
    FORWARDER = "haproxy"
    # haproxy's drain ends as soon as its old server is idle, so the watch can start within a
    # second of the instance; a 3 s watch could then end before the souring release (unhealthy
    # 2.5 s after it started) fails three checks, and the switch-back test saw it succeed.
    KEEPALIVE_WATCH = 6.0

    def test_clients_keep_their_connections_through_deploys(self, box: Sandbox, serving: App) -> None:
        """The old instance closes haproxy's connections to it (its drain flag); haproxy keeps the
        clients' own: each busy client holds one connection and sees every release on it."""
        with Clients(box, "--busy", "4", "--thinkers", "0") as clients:
            for number in range(3):
                record = wait_deployment(box, call(box, "Deploy", "s", serving.commit(f"Kept {number}")))
                assert record["state"] == "succeeded", record
        report = clients.report
        print(f"\n{report['requests']} requests on {report['connections']} connections, "
              f"{report['connection_close_responses']} responses with Connection: close")
        assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
        assert report["connection_close_responses"] == 0
        assert report["connections"] == 4
        assert len(report["clients"]) == 4, report["clients"]
        for client in report["clients"]:
            assert len(client["segments"]) == 4, client  # the first release, then each new one
