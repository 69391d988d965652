"""pip's cache for one app's environment builds, /var/cache/bluegreen/pip-APP, bounded in size.

Each app has its own: a build's unit may write only its own app's cache (the rest of /var/cache
is read-only there), so one app's build cannot plant a wheel that another app's build installs.

This module runs inside the build's transient unit, as ``bluegreen-build`` (the cache's owner:
the controller may not write under /var/cache), after pip:
``python3 -I -m bluegreen.release.pipcache DIRECTORY``.

The cache is bounded by size, least recently used entries first (a file's last use is the later
of its access and modification times; with relatime, the access time is good to a day), rather
than by age: a size is what the disk can be promised whatever the pace of builds, and an app
whose dependencies have not changed for months keeps the wheels that the next rebuild of its
environment (a new Python, or a host without the package index) needs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 512 << 20
CACHE_ROOT = Path("/var/cache")


def cache_directory(app: str) -> str:
    """The app's cache as systemd's CacheDirectory= names it (under /var/cache)."""
    return f"bluegreen/pip-{app}"


def path(app: str) -> Path:
    return CACHE_ROOT / cache_directory(app)


@dataclass
class _Entry:
    """Files pip writes and reads together (an HTTP response's headers and its ``.body``)."""

    files: list[Path]
    size: int = 0
    used: float = 0.0


def prune(root: Path, limit: int = MAX_BYTES) -> tuple[int, int]:
    """Delete the least recently used entries until the cache holds at most ``limit`` bytes;
    return how many files and bytes went."""
    entries: dict[str, _Entry] = {}
    for directory, _subdirs, names in os.walk(root):
        for name in names:
            file = Path(directory, name)
            try:
                st = file.lstat()
            except FileNotFoundError:
                continue
            entry = entries.setdefault(str(file).removesuffix(".body"), _Entry([]))
            entry.files.append(file)
            entry.size += st.st_size
            entry.used = max(entry.used, st.st_atime, st.st_mtime)
    total = sum(entry.size for entry in entries.values())
    removed = freed = 0
    for entry in sorted(entries.values(), key=lambda e: e.used):
        if total <= limit:
            break
        for file in entry.files:
            file.unlink(missing_ok=True)
            removed += 1
        total -= entry.size
        freed += entry.size
    for directory, _subdirs, _names in os.walk(root, topdown=False):
        if Path(directory) != root:
            with contextlib.suppress(OSError):  # not empty: it stays
                os.rmdir(directory)
    return removed, freed


def main(argv: list[str]) -> int:
    root = Path(argv[1])
    limit = int(argv[2]) if len(argv) > 2 else MAX_BYTES
    removed, freed = prune(root, limit)
    if removed:
        print(f"pip's cache: deleted {removed} files ({freed >> 20} MiB) used least recently, "
              f"to stay under {limit >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
