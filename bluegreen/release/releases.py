"""Releases on disk: one verified directory per commit under /var/lib/bluegreen/releases.

A release is exported into a staging directory (its name starts with a dot), verified there,
and renamed into place: a directory named after a commit is always complete and verified.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from bluegreen.files import fsync_directory, give_tree
from bluegreen.release.repository import Repository

log = logging.getLogger(__name__)


class Releases:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha: str) -> Path:
        return self.root / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_dir()

    def on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def stage(self, repository: Repository, sha: str) -> Path:
        """Export ``sha`` into a new staging directory and return it."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=self.root))
        try:
            os.chmod(staging, 0o755)
            await repository.export(sha, staging)
        except BaseException:
            self.discard(staging)
            raise
        return staging

    def publish(self, staging: Path, sha: str) -> Path:
        """Rename a verified staging directory into place."""
        final = self.path(sha)
        if final.is_dir():  # verified meanwhile by another deployment of the same commit
            self.discard(staging)
            return final
        os.rename(staging, final)
        fsync_directory(self.root)
        return final

    def discard(self, directory: Path) -> None:
        """Delete a staging directory, whoever owns it: a release being built belongs to the
        build user, whose directories root without CAP_DAC_OVERRIDE may not write into until
        it has taken them back. Call it only once no build runs in it."""
        try:
            if directory.is_dir() and not directory.is_symlink():
                give_tree(directory, 0, 0)
                shutil.rmtree(directory)
            else:
                directory.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot delete %s: %s", directory, exc)

    def remove_incomplete(self) -> None:
        """Drop staging directories left by a controller that died while exporting or
        verifying (after its build units are stopped)."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                self.discard(entry)

    def prune(self, newest_first: Sequence[str], keep: int, protected: Collection[str]) -> list[str]:
        """Delete releases beyond the ``keep`` most recently deployed ones; never ``protected``.

        ``newest_first`` orders commits by their last deployment; releases it does not know
        count as older than all of them. Returns the commits deleted.
        """
        present = set(self.on_disk())
        ranked = [sha for sha in dict.fromkeys(newest_first) if sha in present]
        ranked += sorted(present - set(ranked), key=lambda sha: -self.path(sha).stat().st_mtime)
        kept = set(ranked[:keep]) | set(protected)
        deleted = []
        for sha in ranked:
            if sha in kept:
                continue
            doomed = self.root / f".deleting.{sha}"
            os.rename(self.path(sha), doomed)  # gone from view at once, then removed
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(sha)
        return deleted
