from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bluegreen import drainflag, instances
from bluegreen.instances import InstanceSpec


def spec(tmp_path: Path, port: int = 8123) -> InstanceSpec:
    return InstanceSpec(port=port, wsgi="app:app", workers=2, worker_class="gthread",
                        app_environment={"BLUEGREEN_RELEASE": "a" * 40},
                        drain_file=drainflag.path(tmp_path, port))


def test_the_instance_is_told_where_its_flag_is(tmp_path: Path) -> None:
    instances.write_env(tmp_path, spec(tmp_path))
    assert instances.read_env(tmp_path, 8123)["BLUEGREEN_DRAIN_FILE"] == \
        str(tmp_path / "instances" / "8123.drain")


def test_put_and_clear(tmp_path: Path) -> None:
    drainflag.put(tmp_path, 8123)
    assert drainflag.path(tmp_path, 8123).exists()
    drainflag.put(tmp_path, 8123)  # again: no error
    drainflag.clear(tmp_path, 8123)
    assert not drainflag.path(tmp_path, 8123).exists()
    drainflag.clear(tmp_path, 8123)  # again: no error


def test_removing_the_settings_removes_the_flag(tmp_path: Path) -> None:
    instances.write_env(tmp_path, spec(tmp_path))
    drainflag.put(tmp_path, 8123)
    drainflag.put(tmp_path, 8124)
    instances.remove_env(tmp_path, 8123)
    assert not drainflag.path(tmp_path, 8123).exists()
    assert drainflag.path(tmp_path, 8124).exists()


def test_a_flag_that_cannot_be_written_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "instances").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        drainflag.put(tmp_path, 8123)
        drainflag.clear(tmp_path, 8123)
    assert "keep-alive connections stay on port 8123" in caplog.text
    assert "closes every connection" in caplog.text
