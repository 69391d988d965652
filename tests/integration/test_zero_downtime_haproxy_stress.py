"""The zero-downtime test with HAProxy through ten deploys; the default suite runs four (marker
stress: scripts/test --stress)."""

from __future__ import annotations

import pytest

from tests.integration.test_zero_downtime import (  # noqa: F401 (collected here too)
    DEPLOYS,
    test_deploys_under_load_fail_no_request,
)
from tests.integration.test_zero_downtime_haproxy import config_extra  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.stress]


@pytest.fixture(scope="module")
def deploys() -> int:
    return DEPLOYS
