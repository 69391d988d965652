from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import pytest

from bluegreen.release import venvs
from bluegreen.release.venvs import DependencyError, Venvs


def release(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_no_dependency_file_means_no_environment(tmp_path: Path) -> None:
    assert venvs.dependencies(release(tmp_path, {"app.py": ""})) is None
    assert venvs.dependencies(release(tmp_path, {"pyproject.toml": "[project]\nname='x'\n"})) is None


def test_the_key_follows_the_dependency_files_not_the_code(tmp_path: Path) -> None:
    one = venvs.dependencies(release(tmp_path / "1", {
        "requirements.txt": "-r base.txt\nflask==3.0.3\n", "base.txt": "sqlalchemy==2.0.30\n",
        "app.py": "one"}))
    code_only = venvs.dependencies(release(tmp_path / "2", {
        "requirements.txt": "-r base.txt\nflask==3.0.3\n", "base.txt": "sqlalchemy==2.0.30\n",
        "app.py": "two"}))
    included_changed = venvs.dependencies(release(tmp_path / "3", {
        "requirements.txt": "-r base.txt\nflask==3.0.3\n", "base.txt": "sqlalchemy==2.0.31\n"}))
    assert one is not None and code_only is not None and included_changed is not None
    assert one.digest == code_only.digest
    assert one.digest != included_changed.digest
    assert one.pip_arguments() == ["-r", "requirements.txt"]


def test_pyproject_dependencies(tmp_path: Path) -> None:
    found = venvs.dependencies(release(tmp_path, {
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
        venvs.dependencies(release(tmp_path, files))


def test_prune_keeps_what_releases_use_and_drops_unfinished(tmp_path: Path) -> None:
    envs = Venvs(tmp_path)
    for key in ("used", "unused", "unfinished"):
        (tmp_path / key / "bin").mkdir(parents=True)
    for key in ("used", "unused"):
        (tmp_path / key / venvs.READY).write_text("requirements.txt\n")
    assert sorted(envs.prune({"used", "unfinished"})) == ["unfinished", "unused"]
    assert envs.on_disk() == ["used"]
    assert envs.ready("used")


def test_a_rebuild_of_the_same_python_keeps_the_key(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Debian security update of python3.11 changes sys.version, not the ABI: no environment
    is rebuilt (and a host without the package index still deploys)."""
    files = {"requirements.txt": "flask==3.0.3\n"}
    before = venvs.dependencies(release(tmp_path / "1", files))
    monkeypatch.setattr(sys, "version", "3.11.2 (main, Mar 13 2099, 12:00:00) [GCC 12.2.0]")
    after = venvs.dependencies(release(tmp_path / "2", files))
    assert before is not None and after is not None
    assert before.digest == after.digest


def test_another_abi_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"requirements.txt": "flask==3.0.3\n"}
    before = venvs.dependencies(release(tmp_path / "1", files))
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda name: "cpython-312-x86_64-linux-gnu" if name == "SOABI" else None)
    after = venvs.dependencies(release(tmp_path / "2", files))
    assert before is not None and after is not None
    assert before.digest != after.digest


@pytest.mark.parametrize(("requirements", "local"), [
    ("./libs/x\n", "libs/x/setup.py"),
    ("-e ./libs/x\n", "libs/x/setup.py"),
    ("--editable=libs/x\n", "libs/x/setup.py"),
    ("-e .\n", "libs/x/setup.py"),
    (".\n", "app.py"),
    ("x @ file:./libs/x\n", "libs/x/setup.py"),
    ("file:libs/x#egg=x\n", "libs/x/setup.py"),
    ("./wheels/x-1.0-py3-none-any.whl --hash=sha256:00\n", "wheels/x-1.0-py3-none-any.whl"),
    ("-f ./wheels\nx==1.0\n", "wheels/x-1.0-py3-none-any.whl"),
    ("--find-links=wheels\nx==1.0\n", "wheels/x-1.0-py3-none-any.whl"),
    ("-r more/base.txt\n", "more/libs/y.py"),  # a path in an included file: the release's
])
def test_a_change_in_a_local_requirement_changes_the_key(tmp_path: Path, requirements: str,
                                                         local: str) -> None:
    files = {"requirements.txt": requirements, "app.py": "app = 1\n",
             "libs/x/setup.py": "setup()\n", "wheels/x-1.0-py3-none-any.whl": "zip",
             "more/base.txt": "-e ./more/libs\n", "more/libs/y.py": "y = 1\n"}
    before = venvs.dependencies(release(tmp_path / "1", files))
    after = venvs.dependencies(release(tmp_path / "2", {**files, local: "changed\n"}))
    assert before is not None and after is not None
    assert before.digest != after.digest


def test_an_empty_specifier_names_no_local_project() -> None:
    assert venvs.local_references("") == []
    assert venvs.local_references("   ") == []


def test_local_requirements_outside_the_key_leave_it_alone(tmp_path: Path) -> None:
    files = {"requirements.txt": "-e ./libs/x\nflask[async]==3.0.3 ; python_version > '3'\n"
             "git+https://example.com/y.git#egg=y\n", "libs/x/setup.py": "setup()\n",
             "app.py": "one\n"}
    before = venvs.dependencies(release(tmp_path / "1", files))
    after = venvs.dependencies(release(tmp_path / "2", {**files, "app.py": "two\n"}))
    assert before is not None and after is not None
    assert before.digest == after.digest


def test_a_pyproject_file_dependency_is_hashed(tmp_path: Path) -> None:
    files = {"pyproject.toml": '[project]\nname = "x"\ndependencies = ["y @ file:./libs/y"]\n',
             "libs/y/setup.py": "setup()\n"}
    before = venvs.dependencies(release(tmp_path / "1", files))
    changed = {**files, "libs/y/setup.py": "setup(name='y')\n"}
    after = venvs.dependencies(release(tmp_path / "2", changed))
    assert before is not None and after is not None
    assert before.digest != after.digest


def test_what_lies_outside_the_release_counts_by_name(tmp_path: Path) -> None:
    """The host's own directories are not the release's to hash (nor walked: ``-e /``)."""
    outside = tmp_path / "host" / "wheels"
    outside.mkdir(parents=True)
    (tmp_path / "1" / "libs").mkdir(parents=True)
    (tmp_path / "1" / "libs" / "y").symlink_to(outside)
    files = {"requirements.txt": f"-f {outside}\n-e /\n-e ./libs/y\nx==1.0\n"}
    before = venvs.dependencies(release(tmp_path / "1", files))
    (outside / "x-1.0-py3-none-any.whl").write_text("zip")
    after = venvs.dependencies(release(tmp_path / "1", files))
    assert before is not None and after is not None
    assert before.digest == after.digest


def built(envs: Venvs, key: str, ready: str | None = None) -> None:
    (envs.path(key) / "bin").mkdir(parents=True)
    text = ready if ready is not None else f"requirements.txt\nabi {venvs.interpreter_abi()}\n"
    (envs.path(key) / venvs.READY).write_text(text)


def test_a_release_runs_on_the_environment_it_was_verified_with(tmp_path: Path) -> None:
    """Its build may have changed the project ``-e .`` installs since: a rollback still finds
    the environment, and pruning keeps it."""
    envs = Venvs(tmp_path / "environments")
    published = release(tmp_path / "releases" / ("a" * 40), {"requirements.txt": "-e .\n",
                                                             "app.py": "one\n"})
    wanted = venvs.dependencies(published)
    assert wanted is not None
    built(envs, wanted.digest)
    assert envs.find(published, wanted) == wanted.digest
    envs.record(published, wanted.digest)
    (published / "static.css").write_text("built by release.build_command\n")
    changed = venvs.dependencies(published)
    assert changed is not None and changed.digest != wanted.digest
    assert envs.find(published, changed) == wanted.digest
    assert envs.used_by([published]) == {wanted.digest}
    assert envs.prune(envs.used_by([published])) == []


def test_what_a_staging_directory_records_is_not_trusted(tmp_path: Path) -> None:
    envs = Venvs(tmp_path / "environments")
    built(envs, "f" * 32)
    staging = release(tmp_path / "releases" / ".aaaaaaaaaaaa.x1", {
        "requirements.txt": "flask\n", venvs.RECORDED: "f" * 32 + "\n"})
    wanted = venvs.dependencies(staging)
    assert wanted is not None
    assert envs.find(staging, wanted) is None


def test_an_environment_of_another_python_is_not_reused(tmp_path: Path) -> None:
    envs = Venvs(tmp_path / "environments")
    published = release(tmp_path / "releases" / ("a" * 40), {"requirements.txt": "flask\n"})
    wanted = venvs.dependencies(published)
    assert wanted is not None
    other = "abi cpython 3.10 cpython-310-x86_64-linux-gnu linux-x86_64"
    built(envs, wanted.digest, f"requirements.txt\n{other}\n")
    envs.record(published, wanted.digest)
    assert envs.find(published, wanted) is None


def test_an_environment_an_older_version_built_is_found_again(tmp_path: Path) -> None:
    envs = Venvs(tmp_path / "environments")
    published = release(tmp_path / "releases" / ("a" * 40), {"requirements.txt": "flask\n"})
    wanted = venvs.dependencies(published)
    assert wanted is not None and wanted.legacy_digest != wanted.digest
    built(envs, wanted.legacy_digest, "requirements.txt\n")
    assert envs.used_by([published]) == {wanted.digest, wanted.legacy_digest}
    assert envs.find(published, wanted) == wanted.legacy_digest
    assert envs.usable(wanted.legacy_digest)  # it names its Python now
