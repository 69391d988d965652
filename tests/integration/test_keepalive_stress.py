"""The keep-alive test with socat through ten deploys; the default suite runs four
(marker stress: scripts/test --stress)."""

from __future__ import annotations

import pytest

from tests.integration.test_keepalive import (  # noqa: F401 (collected and used here too)
    DEPLOYS,
    config_extra,
    serving,
    test_keepalive_clients_move_at_once_and_fail_no_request,
)

pytestmark = [pytest.mark.integration, pytest.mark.stress]


@pytest.fixture(scope="module")
def deploys() -> int:
    return DEPLOYS
