"""The processes of a systemd unit, read from the unified (cgroup v2) hierarchy.

A unit's ``ControlGroup`` (or the ``0::`` line of /proc/PID/cgroup) is a path in the unified
hierarchy, which is /sys/fs/cgroup on a pure cgroup2 host and /sys/fs/cgroup/unified on a
hybrid one.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def unified_root(root: Path = ROOT) -> Path:
    if (root / "cgroup.controllers").exists():
        return root
    return root / "unified"


def own_cgroup(pid: int | str = "self") -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError("no unified cgroup hierarchy (no 0:: line in /proc/self/cgroup)")


def pids(cgroup: str, root: Path = ROOT) -> set[int]:
    """Every process in the cgroup and its sub-cgroups (empty if the cgroup is gone)."""
    base = unified_root(root) / cgroup.lstrip("/")
    found: set[int] = set()
    for directory, _subdirs, files in os.walk(base):
        if "cgroup.procs" not in files:
            continue
        try:
            text = Path(directory, "cgroup.procs").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.update(int(line) for line in text.split())
    return found
