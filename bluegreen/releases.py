"""Releases on disk: one directory per commit under /var/lib/bluegreen/releases."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bluegreen.files import fsync_directory
from bluegreen.repository import Repository


class Releases:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha: str) -> Path:
        return self.root / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_dir()

    async def materialize(self, repository: Repository, sha: str) -> Path:
        """The release directory of ``sha``, exported from the repository if not yet on disk.

        The tree is written to a temporary directory that is renamed into place when
        complete, so a release directory is never half-written.
        """
        final = self.path(sha)
        if final.is_dir():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=self.root))
        try:
            os.chmod(staging, 0o755)
            await repository.export(sha, staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.root)
        return final

    def remove_incomplete(self) -> None:
        """Drop staging directories left by a controller that died while exporting."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
