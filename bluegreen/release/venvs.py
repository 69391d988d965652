"""Python environments of releases: one venv per set of dependencies, shared by every release
that declares the same ones.

A release declares dependencies with a ``requirements.txt`` (and the files it includes with
``-r``/``-c``) or with ``[project] dependencies`` in its ``pyproject.toml``. The environment's
key is a hash of those files' content, of the local projects, archives and wheel directories
they name (``./libs/x``, ``-e .``, ``file:`` URLs, ``--find-links ./wheels``) and of the ABI of
the Python that runs them (implementation, major.minor, platform): a commit that changes only
code finds its environment built and installs nothing, and a security update of Debian's
python3.11 rebuilds nothing. Environments are venvs of Debian's ``python3`` made with
``--system-site-packages``: what the app pins wins, and what it does not (gunicorn, say) comes
from Debian.

An environment is built where it stays, ``environments/KEY`` (a venv's scripts name its path),
by the user ``bluegreen-build`` in a transient unit; it counts only once ``.bluegreen-ready``
is there, written after the build succeeded and the tree went back to root, with the ABI it
was built for. A verified release records the key of its environment
(``.bluegreen-environment``): a rollback or a restart finds it again even if the release's build
changed a local project since, and the environments of releases on disk are kept. An environment
of another ABI (after an upgrade to a new Python) is rebuilt by the next deploy that needs it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import sysconfig
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bluegreen.files import atomic_write, give_tree

SYSTEM_PYTHON = Path("/usr/bin/python3")
READY = ".bluegreen-ready"
# In a release: the key of the environment it was verified with.
RECORDED = ".bluegreen-environment"
_KEY = re.compile(r"[0-9a-f]{32}")

_INCLUDE = re.compile(r"^\s*(?:-r|--requirement|-c|--constraint)(?:\s+|=)(\S+)", re.MULTILINE)
# Options whose value may name a local project or a directory of wheels.
_PATH_OPTIONS = ("-e", "--editable", "-f", "--find-links")
# Never part of a local project's content as pip builds it.
_SKIPPED = {".git", "__pycache__", RECORDED}
_ARCHIVES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class DependencyError(Exception):
    """The release's dependency files cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Dependencies:
    """What a release asks pip to install: a requirements file or a list of specifiers."""

    requirements: str = ""  # path relative to the release
    specifiers: tuple[str, ...] = ()
    digest: str = ""
    # The key older versions gave the same files on this very Python (sys.version included),
    # so that the environments they built are found again.
    legacy_digest: str = ""

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


def interpreter_abi() -> str:
    """What decides whether an environment's packages run on this Python: the implementation,
    its major.minor version and ABI flags (SOABI), and the platform. A rebuild of the same
    Python (a Debian security update changes sys.version) changes none of them."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return " ".join((sys.implementation.name, version, sysconfig.get_config_var("SOABI") or "",
                     sysconfig.get_platform()))


def _logical_lines(text: str) -> Iterable[str]:
    """A requirements file's lines as pip reads them: continuations joined, comments gone."""
    for line in re.sub(r"\\\n", "", text).splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            yield line


def local_references(line: str) -> list[str]:
    """The local paths a requirement line (or a PEP 508 specifier) names: a project directory,
    an archive, a wheel directory; none for a name, a VCS or a web URL."""
    words = line.split()
    if not words:
        return []
    first, rest = words[0], line.partition("@")[2].split()
    option = first in _PATH_OPTIONS or first.startswith(("--editable=", "--find-links="))
    if first in _PATH_OPTIONS:
        candidate = words[1] if len(words) > 1 else ""
    elif option:
        candidate = first.partition("=")[2]
    elif first.startswith("-"):
        return []
    elif " @ " in line or "@file:" in line:
        candidate = rest[0] if rest else ""
    else:
        candidate = first
    candidate = candidate.split(";", 1)[0]
    if candidate.startswith("file:"):
        path = unquote(urlsplit(candidate).path)
        return [path] if path else []
    if not candidate or "://" in candidate or "+" in candidate.split("/", 1)[0]:
        return []  # a URL (web, git+https, ...)
    path = re.sub(r"\[[^\]]*\]$", "", candidate)  # ./libs/x[extra]
    if option or path.startswith((".", "/")) or "/" in path or path.endswith(_ARCHIVES):
        return [path]  # an option's value is a path unless a URL; a requirement only if it looks like one
    return []


def _hash_path(digest: Any, path: Path) -> None:
    """Add a file's or a directory tree's names and content to ``digest`` (links as links)."""
    if path.is_symlink():
        digest.update(b"\0link\0" + os.readlink(path).encode())
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name not in _SKIPPED:
                digest.update(f"\0{child.name}/".encode())
                _hash_path(digest, child)
            digest.update(b"\0..")
    elif path.is_file():
        digest.update(b"\0file\0" + path.read_bytes())
    else:
        digest.update(b"\0missing")


def _hash_local(digest: Any, release: Path, including: str, lines: Iterable[str]) -> None:
    """Add the local projects ``lines`` name: pip reads a path relative to its working
    directory (the release), a wheel directory also relative to the file that names it.

    Only what the release carries is read: a path outside it counts by its name, as the
    package index does (and a requirement such as ``-e /`` cannot make the controller walk the
    host's file system)."""
    root = release.resolve()
    for line in lines:
        for reference in local_references(line):
            digest.update(f"\0local\0{reference}".encode())
            path = Path(reference)
            if not path.is_absolute():
                beside = release / Path(including).parent / path
                path = beside if line.startswith(("-f", "--find-links")) and beside.exists() \
                    else release / path
            try:
                path = path.resolve()
                if path.is_relative_to(root):
                    _hash_path(digest, path)
            except OSError as exc:
                digest.update(f"\0unreadable {exc.errno}".encode())


def dependencies(release: Path) -> Dependencies | None:
    """The release's declared dependencies, or None when it declares none."""
    digest = hashlib.sha256(f"{interpreter_abi()}\n".encode())
    legacy = hashlib.sha256(f"{sys.implementation.cache_tag} {sys.version}\n".encode())
    if (release / "requirements.txt").is_file():
        files: dict[str, bytes] = {}
        _requirement_files(release, "requirements.txt", files)
        for name in sorted(files):
            for hashed in (digest, legacy):
                hashed.update(f"\0{name}\0".encode() + files[name])
        for name in sorted(files):
            _hash_local(digest, release, name, _logical_lines(files[name].decode("utf-8", "replace")))
        return Dependencies(requirements="requirements.txt", digest=digest.hexdigest()[:32],
                            legacy_digest=legacy.hexdigest()[:32])
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
            for hashed in (digest, legacy):
                hashed.update(b"\0pyproject\0" + "\n".join(specifiers).encode())
            _hash_local(digest, release, "pyproject.toml", specifiers)
            return Dependencies(specifiers=tuple(specifiers), digest=digest.hexdigest()[:32],
                                legacy_digest=legacy.hexdigest()[:32])
    return None


class Venvs:
    """The environments on disk, one directory per dependency set (its key)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> bool:
        return (self.path(key) / READY).is_file()

    def usable(self, key: str, legacy: bool = False) -> bool:
        """Ready, and built for this Python's ABI (an environment of an older version names
        none: ``legacy`` says its key vouches for the Python)."""
        try:
            text = (self.path(key) / READY).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False
        abi = [line[4:] for line in text.splitlines() if line.startswith("abi ")]
        return abi == [interpreter_abi()] if abi else legacy

    def find(self, release: Path, wanted: Dependencies) -> str | None:
        """The key of a built environment the release runs on, if there is one: the one it
        was verified with, one with its dependencies, or one an older version built for them."""
        keys = [wanted.digest]
        # A staging directory's name starts with a dot (release/releases.py): what it records comes
        # from the repository, not from a verification.
        recorded = None if release.name.startswith(".") else self.recorded(release)
        if recorded:
            keys.insert(0, recorded)
        for key in keys:
            if self.usable(key):
                return key
        legacy = wanted.legacy_digest
        if legacy and _KEY.fullmatch(legacy) and self.usable(legacy, legacy=True):
            self._mark_ready(legacy, wanted)  # it names its ABI from now on
            return legacy
        return None

    def recorded(self, release: Path) -> str | None:
        """The key of the environment ``release`` was verified with (None if unknown)."""
        try:
            key = (release / RECORDED).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return key if _KEY.fullmatch(key) else None

    def record(self, release: Path, key: str) -> None:
        atomic_write(release / RECORDED, f"{key}\n")

    def used_by(self, releases: Iterable[Path]) -> set[str]:
        """The environments ``releases`` run on (or may: releases verified by older versions
        record none)."""
        keys = set()
        for release in releases:
            recorded = self.recorded(release)
            if recorded:
                keys.add(recorded)
                continue
            try:
                wanted = dependencies(release)
            except DependencyError:
                continue
            if wanted is not None:
                keys.update((wanted.digest, wanted.legacy_digest))
        return keys

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
        give_tree(self.path(key), 0, 0)
        self._mark_ready(key, dependencies)

    def _mark_ready(self, key: str, dependencies: Dependencies) -> None:
        what = dependencies.requirements or " ".join(dependencies.specifiers)
        atomic_write(self.path(key) / READY, f"{what}\nabi {interpreter_abi()}\n")

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
