from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from bluegreen import instances
from bluegreen.config import AppConfig, Config
from bluegreen.files import atomic_write, environment_file, give_tree
from bluegreen.instances import InstanceSpec
from bluegreen.release import appenv


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
    config = Config(app=AppConfig(team="3", environment={"GREETING": 'say "hi" \\o/'}))
    env = appenv.environment(config, "a" * 40, Path("/var/lib/bluegreen/releases/x"), None, 7)
    spec = InstanceSpec(port=8123, wsgi="app:app", workers=2, worker_class="sync", app_environment=env,
                        drain_file=tmp_path / "instances" / "8123.drain")
    instances.write_env(tmp_path, spec)
    assert stat.S_IMODE(instances.env_path(tmp_path, 8123).stat().st_mode) == 0o600
    values = instances.read_env(tmp_path, 8123)
    assert values == spec.environment()
    assert values["TEAM_NUMBER"] == "3"
    assert values["GREETING"] == 'say "hi" \\o/'
    assert values["BLUEGREEN_PYTHON"] == "/usr/bin/python3"
    assert spec.release == "a" * 40
    assert instances.read_app_environment(tmp_path, 8123) == env  # what its workers get
    instances.remove_env(tmp_path, 8123)
    assert instances.read_env(tmp_path, 8123) == {}


def test_unit_names() -> None:
    assert instances.unit(8123) == "bluegreen-app@8123.service"
    assert instances.port_of("bluegreen-app@8123.service") == 8123
    assert instances.port_of("bluegreen-forward@8123.service") is None


def test_give_tree_never_follows_a_link_and_leaves_the_tree_readable(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not yours\n")
    os.chmod(outside, 0o600)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "private").write_text("x")
    os.chmod(tree / "sub" / "private", 0o600)
    (tree / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tree / "run.sh", 0o700)
    os.chmod(tree / "sub", 0o700)
    (tree / "link").symlink_to(outside)
    (tree / "dirlink").symlink_to(tmp_path)
    uid, gid = os.getuid(), os.getgid()
    give_tree(tree, uid, gid)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # the link's target is untouched
    assert stat.S_IMODE((tree / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "sub" / "private").stat().st_mode) == 0o644
    assert stat.S_IMODE((tree / "run.sh").stat().st_mode) == 0o755
    assert (tree / "link").is_symlink()


def test_an_instance_imports_its_app_from_the_web_lines_directory(tmp_path: Path) -> None:
    # The unit's gunicorn --chdir is ${BLUEGREEN_RELEASE_DIR}${BLUEGREEN_WEB_DIR}, as systemd
    # expands it from the instance's settings; a file written before (no BLUEGREEN_WEB_DIR)
    # still names the release's directory.
    unit = (Path(__file__).resolve().parents[2] / "units/bluegreen-app@.service").read_text()
    chdir = re.search(r"--chdir (\S+)", unit)
    assert chdir is not None

    def expanded(settings: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda name: settings.get(name[1], ""), chdir[1])

    release = Path("/var/lib/bluegreen/releases/x")
    env = appenv.environment(Config(), "a" * 40, release, None, 7)
    for web_dir, where in (("backend/src", release / "backend/src"), ("", release)):
        spec = InstanceSpec(port=8123, wsgi="config.wsgi:application", workers=2,
                            worker_class="sync", app_environment=env, web_dir=web_dir)
        instances.write_env(tmp_path, spec)
        assert expanded(instances.read_env(tmp_path, 8123)) == str(where)
    assert expanded(env) == str(release)
