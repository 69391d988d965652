"""pip's cache: one per app, bounded in size, least recently used entries first."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bluegreen.config import Config
from bluegreen.release import pipcache, transient, verify
from bluegreen.release.transient import Command
from bluegreen.release.venvs import Venvs


def build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, app: str) -> Command:
    """The command that builds an environment for ``app``."""
    ran: list[Command] = []

    async def run(systemd: Any, command: Command, deployment_id: int | None = None) -> None:
        ran.append(command)

    monkeypatch.setattr(transient, "run", run)
    monkeypatch.setattr(verify, "build_identity", lambda: (os.getuid(), os.getgid()))
    release = tmp_path / app / "release"
    release.mkdir(parents=True)
    (release / "requirements.txt").write_text("flask==3.0.3\n")
    verifier = verify.Verifier(None, replace(Config(), app_name=app),  # type: ignore[arg-type]
                               Venvs(tmp_path / app / "environments"), 1)
    asyncio.run(verifier.environment(release))
    (command,) = ran
    return command


def test_each_app_builds_with_its_own_pip_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build may write only its own app's cache: one app's build cannot plant a wheel that
    another app's build installs."""
    default = build_command(tmp_path, monkeypatch, "default")
    blog = build_command(tmp_path, monkeypatch, "blog")
    assert default.cache_directories != blog.cache_directories
    for command, app in ((default, "default"), (blog, "blog")):
        assert command.cache_directories == [pipcache.cache_directory(app)]
        assert command.environment["PIP_CACHE_DIR"] == f"/var/cache/{pipcache.cache_directory(app)}"
        assert "bluegreen.release.pipcache" in command.argv[2]  # pruned after each build
        assert command.app == app


def cached(root: Path, name: str, size: int, used: float) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    os.utime(path, (used, used))
    return path


def test_prune_drops_the_least_recently_used_until_under_the_limit(tmp_path: Path) -> None:
    old = cached(tmp_path, "http/a/b/old", 40_000, 1_000)
    old_body = cached(tmp_path, "http/a/b/old.body", 400_000, 1_000)
    middle = cached(tmp_path, "wheels/c/d/middle-1.0-py3-none-any.whl", 400_000, 2_000)
    recent = cached(tmp_path, "http/e/f/recent", 400_000, 3_000)
    removed, freed = pipcache.prune(tmp_path, limit=900_000)
    assert (removed, freed) == (2, 440_000)
    assert not old.exists() and not old_body.exists()  # an entry goes as a whole
    assert not (tmp_path / "http" / "a").exists()  # and its empty directories with it
    assert middle.exists() and recent.exists()
    assert pipcache.prune(tmp_path, limit=900_000) == (0, 0)
    pipcache.prune(tmp_path, limit=0)
    assert list(tmp_path.iterdir()) == []
