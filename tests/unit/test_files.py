from __future__ import annotations

import os
from pathlib import Path

import pytest

from bluegreen import instances
from bluegreen.files import atomic_write, environment_file
from bluegreen.instances import InstanceSpec


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.env"
    atomic_write(target, "one\n")
    atomic_write(target, "two\n", mode=0o600)
    assert target.read_text() == "two\n"
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["file.env"]


def test_environment_file_quotes_for_systemd() -> None:
    assert environment_file({"A": 'say "hi" \\o/'}) == 'A="say \\"hi\\" \\\\o/"\n'
    with pytest.raises(ValueError, match="newline"):
        environment_file({"A": "two\nlines"})


def test_instance_settings_round_trip(tmp_path: Path) -> None:
    spec = InstanceSpec(port=8123, release="a" * 40, release_dir=Path("/var/lib/bluegreen/releases/x"),
                        wsgi="app:app", workers=2, worker_class="sync", deployment_id="7", team="3")
    instances.write_env(tmp_path, spec)
    values = instances.read_env(tmp_path, 8123)
    assert values == spec.environment()
    assert values["TEAM_NUMBER"] == "3"
    instances.remove_env(tmp_path, 8123)
    assert instances.read_env(tmp_path, 8123) == {}


def test_unit_names() -> None:
    assert instances.unit(8123) == "bluegreen-app@8123.service"
    assert instances.port_of("bluegreen-app@8123.service") == 8123
    assert instances.port_of("bluegreen-forward@8123.service") is None
