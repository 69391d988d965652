"""The zero-downtime and keep-alive tests (forwarder_suite.py) with the built-in forwarder
(forwarder = "proxy")."""

from __future__ import annotations

import pytest

from tests.integration.forwarder_suite import ForwarderSuite

pytestmark = pytest.mark.integration


class TestProxy(ForwarderSuite):
    FORWARDER = "proxy"
