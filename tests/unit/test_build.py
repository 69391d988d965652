"""What a release's build runs, and with what: the app's settings, only the secrets it asks
for, and Django's collectstatic where a Django project has static files."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bluegreen import apps
from bluegreen.config import Config
from bluegreen.release import appenv, transient, verify
from bluegreen.release.transient import Command
from bluegreen.release.venvs import Venvs


def run_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Config,
               build: str = "", files: tuple[str, ...] = (),
               wsgi: str = "myproject.wsgi:application", web_dir: str = "") -> list[Command]:
    """The commands verify runs for a release holding ``files``, ``build`` being the steps the
    Procfile's web line maps to the build, ``web_dir`` the directory it serves from."""
    ran: list[Command] = []

    async def run(systemd: Any, command: Command, deployment_id: int | None = None) -> None:
        ran.append(command)

    monkeypatch.setattr(transient, "run", run)
    monkeypatch.setattr(verify, "build_identity", lambda: (os.getuid(), os.getgid()))
    monkeypatch.setattr(verify, "give_tree", lambda *args: None)
    secrets = tmp_path / "secrets"
    secrets.mkdir(parents=True)
    for name in ("DJANGO_SECRET_KEY", "STRIPE_KEY"):
        (secrets / name).write_text("s3cret\n")
    monkeypatch.setattr(apps, "SECRETS_DIR", secrets)
    release = tmp_path / "release"
    release.mkdir()
    for name in files:
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        (release / name).write_text("")
    env = appenv.environment(config, "abc", release, None, 7)
    verifier = verify.Verifier(None, config, Venvs(tmp_path / "environments"), 7)  # type: ignore[arg-type]
    asyncio.run(verifier.verify(release, env, wsgi, build, web_dir=web_dir))
    return ran


def settings(**release: Any) -> Config:
    config = Config()
    return replace(config, app=replace(config.app, environment={"DJANGO_DEBUG": "0"}),
                   release=replace(config.release, **release))


def test_a_build_sees_the_apps_settings_but_no_secret_unless_it_asks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = run_verify(tmp_path, monkeypatch, settings(build_command="make", check_command="true"))
    build, _import, check = ran
    for command in (build, check):
        assert command.user == verify.BUILD_USER
        assert command.environment["DJANGO_DEBUG"] == "0"
        assert command.environment["BLUEGREEN_APP"] == "default"
        assert command.credentials == []
        assert appenv.WITH_SECRETS not in command.argv
        # In the secrets' stead, placeholders: settings that read one at import still load.
        assert command.environment["DJANGO_SECRET_KEY"] == appenv.build_placeholder("DJANGO_SECRET_KEY")
        assert "s3cret" not in str(command.environment)


def test_a_build_gets_the_secrets_it_names_and_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings(build_command="make", build_secrets=("DJANGO_SECRET_KEY", "MISSING"))
    build, _import = run_verify(tmp_path, monkeypatch, config)
    assert build.credentials == [("secrets_DJANGO_SECRET_KEY",
                                  str(tmp_path / "secrets/DJANGO_SECRET_KEY"))]
    assert list(build.argv) == [appenv.WITH_SECRETS, "/bin/sh", "-c", "make"]
    assert "DJANGO_SECRET_KEY" not in build.environment  # the secret, from with-secrets
    assert build.environment["STRIPE_KEY"] == appenv.build_placeholder("STRIPE_KEY")


def test_a_django_project_gets_collectstatic_at_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    collect, _import = run_verify(tmp_path, monkeypatch, settings(), files=("manage.py",))
    assert collect.what == "collectstatic"
    assert collect.user == verify.BUILD_USER and collect.writable == [tmp_path / "release"]
    assert "collectstatic" in collect.argv[-1] and "STATIC_ROOT" in collect.argv[-1]
    # Not without manage.py, not when turned off, not twice.
    assert len(run_verify(tmp_path / "a", monkeypatch, settings())) == 1
    assert len(run_verify(tmp_path / "b", monkeypatch, settings(collectstatic=False),
                          files=("manage.py",))) == 1
    mapped = run_verify(tmp_path / "c", monkeypatch, settings(), files=("manage.py",),
                        build="python manage.py collectstatic --no-input")
    assert [command.what for command in mapped] == [
        "the Procfile web line's build steps", "importing myproject.wsgi:application"]
    assert mapped[0].argv[-1] == "python manage.py collectstatic --no-input"
    configured = run_verify(tmp_path / "d", monkeypatch,
                            settings(build_command="./manage.py collectstatic --noinput"),
                            files=("manage.py",))
    assert configured[0].what == "release.build_command"
    assert len(configured) == 2


def test_a_build_that_fails_for_a_secret_it_was_not_given_says_how_to_give_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_verify(tmp_path, monkeypatch, settings(build_command="make"))  # the secrets in place

    async def run(systemd: Any, command: Command, deployment_id: int | None = None) -> None:
        raise transient.CommandFailed(f"{command.what} failed: KeyError: 'DJANGO_SECRET_KEY'")

    monkeypatch.setattr(transient, "run", run)
    release = tmp_path / "release"
    env = appenv.environment(Config(), "abc", release, None, 7)
    for config, hint in ((settings(build_command="make"), True),
                         (settings(build_command="make", build_secrets=("DJANGO_SECRET_KEY",)), False)):
        verifier = verify.Verifier(None, config, Venvs(tmp_path / "environments"), 7)  # type: ignore[arg-type]
        with pytest.raises(verify.VerifyFailed) as failed:
            asyncio.run(verifier.verify(release, env, "myproject.wsgi:application"))
        reason = "release.build_command failed: KeyError: 'DJANGO_SECRET_KEY'"
        assert str(failed.value) == reason + (
            " (a build gets a placeholder for the app's secret DJANGO_SECRET_KEY, the secret "
            "itself only if release.build_secrets names it)" if hint else "")



def test_a_django_project_in_a_subdirectory_is_built_and_imported_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = run_verify(tmp_path, monkeypatch, settings(), files=("backend/manage.py",),
                     wsgi="config.wsgi:application", web_dir="backend")
    release = tmp_path / "release"
    collect, imported = ran
    assert collect.what == "collectstatic" and collect.directory == release / "backend"
    assert collect.writable == [release]
    assert imported.what == "importing config.wsgi:application"
    assert imported.directory == release / "backend"
