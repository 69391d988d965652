"""The keep-alive test with HAProxy through ten deploys, as test_keepalive_stress.py does with socat
(marker stress: scripts/test --stress)."""

from __future__ import annotations

import pytest

from tests.integration.test_keepalive import (  # noqa: F401 (collected and used here too)
    DEPLOYS,
    serving,
    test_keepalive_clients_move_at_once_and_fail_no_request,
)
from tests.integration.test_keepalive_haproxy import config_extra  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.stress]


@pytest.fixture(scope="module")
def deploys() -> int:
    return DEPLOYS
