"""The keep-alive test again, with the built-in forwarder (forwarder = "proxy")."""

from __future__ import annotations

import pytest

from tests.integration.test_keepalive import (  # noqa: F401 (collected here too)
    CONFIG,
    test_a_switch_back_keeps_connections_alive_again,
    test_keepalive_clients_move_at_once_and_fail_no_request,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config_extra() -> str:
    return f'forwarder = "proxy"\n{CONFIG}'
