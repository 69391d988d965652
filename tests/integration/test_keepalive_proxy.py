"""The keep-alive test again, with the built-in forwarder (forwarder = "proxy"): four deploys
here, ten in test_keepalive_proxy_stress.py (scripts/test --stress)."""

from __future__ import annotations

import pytest

from tests.integration.test_keepalive import (  # noqa: F401 (collected and used here too)
    CONFIG,
    deploys,
    serving,
    test_keepalive_clients_move_at_once_and_fail_no_request,
    test_switch_back_keeps_connections_alive_again,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config_extra() -> str:
    return f'forwarder = "proxy"\n{CONFIG}'
