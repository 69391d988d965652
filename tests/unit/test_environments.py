from __future__ import annotations

from pathlib import Path

import pytest

from bluegreen import environments
from bluegreen.environments import DependencyError, Environments


def release(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_no_dependency_file_means_no_environment(tmp_path: Path) -> None:
    assert environments.dependencies(release(tmp_path, {"app.py": ""})) is None
    assert environments.dependencies(release(tmp_path, {"pyproject.toml": "[project]\nname='x'\n"})) is None


def test_the_key_follows_the_dependency_files_not_the_code(tmp_path: Path) -> None:
    one = environments.dependencies(release(tmp_path / "1", {
        "requirements.txt": "-r base.txt\nflask==3.0.3\n", "base.txt": "sqlalchemy==2.0.30\n",
        "app.py": "one"}))
    code_only = environments.dependencies(release(tmp_path / "2", {
        "requirements.txt": "-r base.txt\nflask==3.0.3\n", "base.txt": "sqlalchemy==2.0.30\n",
        "app.py": "two"}))
    included_changed = environments.dependencies(release(tmp_path / "3", {
        "requirements.txt": "-r base.txt\nflask==3.0.3\n", "base.txt": "sqlalchemy==2.0.31\n"}))
    assert one is not None and code_only is not None and included_changed is not None
    assert one.digest == code_only.digest
    assert one.digest != included_changed.digest
    assert one.pip_arguments() == ["-r", "requirements.txt"]


def test_pyproject_dependencies(tmp_path: Path) -> None:
    found = environments.dependencies(release(tmp_path, {
        "pyproject.toml": '[project]\nname = "x"\ndependencies = ["flask>=3", "requests"]\n'}))
    assert found is not None
    assert found.pip_arguments() == ["--", "flask>=3", "requests"]


@pytest.mark.parametrize("files", [
    {"requirements.txt": "-r ../../etc/passwd\n"},
    {"requirements.txt": "-r missing.txt\n"},
    {"pyproject.toml": "[project\n"},
    {"pyproject.toml": "[project]\ndependencies = 'flask'\n"},
])
def test_unusable_dependency_files_are_an_error(tmp_path: Path, files: dict[str, str]) -> None:
    with pytest.raises(DependencyError):
        environments.dependencies(release(tmp_path, files))


def test_prune_keeps_what_releases_use_and_drops_unfinished(tmp_path: Path) -> None:
    envs = Environments(tmp_path)
    for key in ("used", "unused", "unfinished"):
        (tmp_path / key / "bin").mkdir(parents=True)
    for key in ("used", "unused"):
        (tmp_path / key / environments.READY).write_text("requirements.txt\n")
    assert sorted(envs.prune({"used", "unfinished"})) == ["unfinished", "unused"]
    assert envs.on_disk() == ["used"]
    assert envs.ready("used")
