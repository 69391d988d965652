"""The zero-downtime and keep-alive tests (forwarder_suite.py) with socat, the default forwarder:
a process per connection; keep-alive clients move when the old instance answers with
Connection: close."""

from __future__ import annotations

import pytest

from tests.integration.forwarder_suite import ForwarderSuite

pytestmark = pytest.mark.integration


class TestSocat(ForwarderSuite):
    FORWARDER = "socat"
