"""Files on disk: written so that readers see the old content or the new, never half of either;
trees given to another owner without following a link."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write to a temporary file in the same directory, fsync it, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.rename(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def read_environment_file(path: Path) -> dict[str, str]:
    """The values of a file written by environment_file() ({} if it is gone)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[name] = value
    return values


def environment_file(values: dict[str, str]) -> str:
    """The text of a systemd EnvironmentFile= holding ``values`` (quoted for systemd)."""
    lines = []
    for name, value in values.items():
        if "\n" in value or "\0" in value:
            raise ValueError(f"{name}: a value cannot contain a newline")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{name}="{escaped}"')
    return "\n".join(lines) + "\n"


def give_tree(root: Path, uid: int, gid: int) -> None:
    """Give a directory tree to uid:gid, never following a symbolic link.

    Walks with directory descriptors (``os.fwalk``), so a path swapped for a symlink cannot
    send the walk elsewhere. Directories end up readable and searchable by everyone and
    writable by their owner, files readable by everyone: the tree of a release or an
    environment is read by the app's user, and root without CAP_DAC_OVERRIDE must be able to
    delete it. Call it only while no process of the tree's old owner runs (builds run in
    transient units, whose processes are all gone when the unit ends).
    """

    def give(name: str | Path, dir_fd: int | None, is_dir: bool) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            return
        wanted = stat.S_IMODE(st.st_mode) | 0o444
        if is_dir:
            wanted |= 0o755
        elif st.st_mode & 0o100:
            wanted |= 0o111
        wanted &= ~(stat.S_ISUID | stat.S_ISGID)
        if st.st_uid == os.geteuid():  # we own it: change the mode while we may
            os.chmod(name, wanted, dir_fd=dir_fd)
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            if uid == os.geteuid():
                os.chmod(name, wanted, dir_fd=dir_fd)

    give(root, None, True)
    for _directory, subdirs, files, fd in os.fwalk(root, follow_symlinks=False):
        for name in subdirs:
            give(name, fd, True)
        for name in files:
            give(name, fd, False)
