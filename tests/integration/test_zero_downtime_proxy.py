"""The zero-downtime test again, with the built-in forwarder (forwarder = "proxy")."""

from __future__ import annotations

import pytest

from tests.integration.test_zero_downtime import (  # noqa: F401 (collected here too)
    deploys,
    test_deploys_under_load_fail_no_request,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config_extra() -> str:
    return 'forwarder = "proxy"\npost_switch_watch = 1\n[app]\nworkers = 4\n[health]\ninterval = 0.2\n'
