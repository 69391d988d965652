"""Verifying a release before any unit starts it.

In the release's directory, as the unprivileged user ``bluegreen-build`` and each within
``release.timeout``: the ``release.build_command`` (the directory belongs to that user while it
runs), then an import of the WSGI application in a throwaway Python, then the
``release.check_command``. Afterwards the directory belongs to root again, so nothing the
release runs later can change it.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from bluegreen.run import CommandError, run

BUILD_USER = "bluegreen-build"

# Imports MODULE and resolves CALLABLE (gunicorn's "module:attr" or "module:factory()").
IMPORT_CHECK = """\
import importlib, sys
sys.path.insert(0, ".")
module, _, name = sys.argv[1].partition(":")
target = importlib.import_module(module)
for part in name.split("."):
    call = part.endswith("()")
    target = getattr(target, part[:-2] if call else part)
    if call:
        target = target()
if not callable(target):
    sys.exit(f"{sys.argv[1]} is not callable")
"""


class VerifyFailed(Exception):
    """The release failed a check; the message says which and why."""


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give the tree to uid:gid; its directories stay writable and searchable by their owner
    (so that root, without CAP_DAC_OVERRIDE, can still delete what a build left)."""
    os.chown(root, uid, gid)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            path = os.path.join(directory, name)
            os.lchown(path, uid, gid)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o700)
        for name in files:
            os.lchown(os.path.join(directory, name), uid, gid)


@dataclass(frozen=True)
class Verifier:
    wsgi: str
    build_command: str = ""
    check_command: str = ""
    timeout: float = 600.0
    user: str = BUILD_USER

    def _identity(self) -> tuple[int, int]:
        try:
            entry = pwd.getpwnam(self.user)
        except KeyError:
            raise VerifyFailed(f"the user {self.user} does not exist (it comes with the package; "
                               "systemd-sysusers creates it)") from None
        return entry.pw_uid, entry.pw_gid

    async def _run(self, what: str, argv: list[str], directory: Path, identity: tuple[int, int]) -> None:
        env = {"HOME": str(directory), "PYTHONDONTWRITEBYTECODE": "1", "BLUEGREEN_WSGI": self.wsgi}
        try:
            await run(argv, cwd=directory, env=env, timeout=self.timeout, user=identity)
        except CommandError as exc:
            raise VerifyFailed(f"{what} failed: {exc.reason}") from None

    async def verify(self, directory: Path) -> None:
        identity = self._identity()
        if self.build_command:
            _chown_tree(directory, *identity)
            try:
                await self._run("release.build_command", ["/bin/sh", "-c", self.build_command],
                                directory, identity)
            finally:
                _chown_tree(directory, 0, 0)
        await self._run(f"importing {self.wsgi}", ["/usr/bin/python3", "-c", IMPORT_CHECK, self.wsgi],
                        directory, identity)
        if self.check_command:
            await self._run("release.check_command", ["/bin/sh", "-c", self.check_command],
                            directory, identity)
