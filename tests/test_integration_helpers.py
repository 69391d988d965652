"""The integration tests' own tools, checked without a container."""

from __future__ import annotations

import tomllib

from bluegreen.config import Forwarder, load_mapping
from tests.integration.helpers import settings


def test_settings_are_read_by_bluegreen_as_written() -> None:
    command = 'test -e "a b" || echo \\ done'
    text = settings(1, forwarder="haproxy", workers=4, top={"drain_timeout": 5},
                    app={"worker_class": "gthread"}, health={"timeout": 0.5},
                    release={"build_command": command}, ports={})
    config = load_mapping(tomllib.loads(text), "bluegreen.toml", text)
    assert config.forwarder is Forwarder.HAPROXY
    assert (config.post_switch_watch, config.drain_timeout) == (1, 5)
    assert (config.app.workers, config.app.worker_class) == (4, "gthread")
    assert (config.health.interval, config.health.timeout) == (0.2, 0.5)
    assert config.release.build_command == command
    assert "[ports]" not in text  # an empty table is left out


def test_settings_leave_out_what_is_none() -> None:
    assert tomllib.loads(settings(None, interval=None)) == {}
    assert tomllib.loads(settings(0)) == {"post_switch_watch": 0, "health": {"interval": 0.2}}
