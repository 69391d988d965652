"""The app's process types: its ``Procfile`` (as Heroku, Dokku and piku read it), merged with
the ``[processes]`` table of the configuration.

``web`` is what bluegreen serves itself (gunicorn on the instance's port), ``release`` is the
release phase (``release.migrate_command`` wins over it); every other type is a worker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bluegreen.config import PROCESS_NAME

FILENAME = "Procfile"
_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*)")


class ProcfileError(Exception):
    """The Procfile cannot be used; the message names the line and the reason."""


@dataclass(frozen=True)
class Processes:
    release: str = ""
    workers: Mapping[str, str] = field(default_factory=dict)


def parse(text: str) -> dict[str, str]:
    """Process types of a Procfile: ``name: command`` lines; blank lines and # comments skip."""
    types: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.fullmatch(stripped)
        if not match or not match[2].strip():
            raise ProcfileError(f"{FILENAME}:{number}: expected 'name: command', got {stripped[:60]!r}")
        name = match[1]
        if not PROCESS_NAME.fullmatch(name):
            raise ProcfileError(f"{FILENAME}:{number}: {name!r} is not a process name "
                                "(letters, digits, '-', '_'; at most 32)")
        if name in types:
            raise ProcfileError(f"{FILENAME}:{number}: process type {name!r} appears twice")
        types[name] = match[2].strip()
    return types


def processes(release: Path, migrate_command: str, overrides: Mapping[str, str]) -> Processes:
    """The release phase and the workers of the release in ``release``."""
    try:
        text = (release / FILENAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ProcfileError(f"{FILENAME}: cannot read: {exc}") from None
    types = parse(text)
    release_command = migrate_command or types.pop("release", "")
    types.pop("release", None)
    types.pop("web", None)
    types.update(overrides)
    workers = {name: command for name, command in sorted(types.items()) if command}
    return Processes(release=release_command, workers=workers)
