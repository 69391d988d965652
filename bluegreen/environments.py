"""Python environments of releases: one venv per set of dependencies, shared by every release
that declares the same ones.

A release declares dependencies with a ``requirements.txt`` (and the files it includes with
``-r``/``-c``) or with ``[project] dependencies`` in its ``pyproject.toml``. The environment's
key is a hash of those files' content and of the Python that runs them, so a commit that changes
only code finds its environment built and installs nothing. Environments are venvs of Debian's
``python3`` made with ``--system-site-packages``: what the app pins wins, and what it does not
(gunicorn, say) comes from Debian.

An environment is built where it stays, ``environments/KEY`` (a venv's scripts name its path),
by the user ``bluegreen-build`` in a transient unit; it counts only once ``.bluegreen-ready``
is there, written after the build succeeded and the tree went back to root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from bluegreen.files import atomic_write, give_tree

SYSTEM_PYTHON = Path("/usr/bin/python3")
READY = ".bluegreen-ready"
# pip's downloads and wheels, kept across builds (CacheDirectory= of the build's unit).
PIP_CACHE = "bluegreen/pip"

_INCLUDE = re.compile(r"^\s*(?:-r|--requirement|-c|--constraint)(?:\s+|=)(\S+)", re.MULTILINE)


class DependencyError(Exception):
    """The release's dependency files cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Dependencies:
    """What a release asks pip to install: a requirements file or a list of specifiers."""

    requirements: str = ""  # path relative to the release
    specifiers: tuple[str, ...] = ()
    digest: str = ""

    def pip_arguments(self) -> list[str]:
        if self.requirements:
            return ["-r", self.requirements]
        return ["--", *self.specifiers]


def _requirement_files(release: Path, name: str, seen: dict[str, bytes]) -> None:
    root = release.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise DependencyError(f"{name}: outside the release")
    relative = path.relative_to(root).as_posix()
    if relative in seen:
        return
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise DependencyError(f"{relative}: {exc.strerror}") from None
    seen[relative] = content
    for included in _INCLUDE.findall(content.decode("utf-8", "replace")):
        _requirement_files(release, (Path(relative).parent / included).as_posix(), seen)


def dependencies(release: Path) -> Dependencies | None:
    """The release's declared dependencies, or None when it declares none."""
    digest = hashlib.sha256(f"{sys.implementation.cache_tag} {sys.version}\n".encode())
    if (release / "requirements.txt").is_file():
        files: dict[str, bytes] = {}
        _requirement_files(release, "requirements.txt", files)
        for name in sorted(files):
            digest.update(f"\0{name}\0".encode() + files[name])
        return Dependencies(requirements="requirements.txt", digest=digest.hexdigest()[:32])
    pyproject = release / "pyproject.toml"
    if pyproject.is_file():
        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise DependencyError(f"pyproject.toml: {exc}") from None
        specifiers = project.get("dependencies", []) if isinstance(project, dict) else []
        if not isinstance(specifiers, list) or not all(isinstance(s, str) for s in specifiers):
            raise DependencyError("pyproject.toml: [project] dependencies is not a list of strings")
        if specifiers:
            digest.update(b"\0pyproject\0" + "\n".join(specifiers).encode())
            return Dependencies(specifiers=tuple(specifiers), digest=digest.hexdigest()[:32])
    return None


class Environments:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> bool:
        return (self.path(key) / READY).is_file()

    def python(self, key: str) -> Path:
        return self.path(key) / "bin" / "python3"

    def prepare(self, key: str, owner: tuple[int, int]) -> Path:
        """An empty directory for building ``key`` in, belonging to ``owner``."""
        self.discard(key)
        self.root.mkdir(parents=True, exist_ok=True)
        directory = self.path(key)
        directory.mkdir(mode=0o755)
        os.chown(directory, *owner)
        return directory

    def complete(self, key: str, dependencies: Dependencies) -> None:
        """The build succeeded: give the tree to root and mark it ready."""
        directory = self.path(key)
        give_tree(directory, 0, 0)
        what = dependencies.requirements or " ".join(dependencies.specifiers)
        atomic_write(directory / READY, f"{what}\n")

    def discard(self, key: str) -> None:
        directory = self.path(key)
        if directory.exists():
            give_tree(directory, 0, 0)  # a build user's 0500 directory is no obstacle then
            shutil.rmtree(directory, ignore_errors=True)

    def on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def prune(self, in_use: Collection[str]) -> list[str]:
        """Delete the environments no release on disk uses (and unfinished ones)."""
        deleted = []
        for key in self.on_disk():
            if key not in in_use or not self.ready(key):
                self.discard(key)
                deleted.append(key)
        return deleted
