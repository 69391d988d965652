"""The application's git repository: a bare mirror under the state directory.

``resolve`` turns what a user asked for (nothing, a branch, a tag, a commit) into a commit of
the configured repository; ``export`` writes that commit's tree into a directory.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from bluegreen.credentials import Secrets
from bluegreen.files import atomic_write
from bluegreen.run import CommandError, run

_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")
_HEX = re.compile(r"[0-9a-f]{4,40}")

_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_ASKPASS": "/bin/false",
}
_HOST_KEY_HINT = ("the server's host key is not one pinned in repository.ssh_known_hosts "
                  "(ssh-keyscan HOST prints them)")


class RepositoryError(Exception):
    """Git could not do what was asked; the message says why."""


class InvalidRef(RepositoryError):
    """The ref is not something bluegreen would pass to git."""


class UnknownRef(RepositoryError):
    """The ref names no branch, tag or commit of the repository."""


def validate_ref(ref: str) -> str:
    """Reject refs that are not plain branch, tag or commit names (paths, options, ranges)."""
    if ref == "":
        return ref
    problem = None
    if not _REF.fullmatch(ref):
        problem = "may hold only letters, digits and . _ / - and must not start with - . or /"
    elif ".." in ref or "//" in ref or ref.endswith(("/", ".", ".lock")) or "/." in ref:
        problem = "is not a valid git ref name"
    if problem:
        raise InvalidRef(f"ref {ref!r} {problem}")
    return ref


@dataclass(frozen=True)
class Commit:
    sha: str
    subject: str
    author: str
    timestamp: int

    @property
    def short(self) -> str:
        return self.sha[:12]


class Repository:
    def __init__(self, url: str, branch: str, mirror: Path, secrets: Secrets | None = None,
                 known_hosts: Path | None = None) -> None:
        self.url = url
        self.branch = branch
        self.mirror = mirror
        self.secrets = secrets or Secrets()
        # ssh trusts the host keys in this file and no other (never ~/.ssh, hidden anyway).
        self.known_hosts = known_hosts or mirror.with_name("ssh_known_hosts")

    def trust(self, known_hosts: str) -> None:
        """The ssh host keys git may trust: repository.ssh_known_hosts, in ssh's own file."""
        atomic_write(self.known_hosts, known_hosts + ("\n" if known_hosts else ""))

    def ssh_command(self) -> str:
        """GIT_SSH_COMMAND: no prompt, only the pinned host keys, only the ssh-key credential."""
        options = ["BatchMode=yes", "StrictHostKeyChecking=yes", "UpdateHostKeys=no",
                   f"UserKnownHostsFile={self.known_hosts}"]
        if self.secrets.ssh_key is not None:
            options += ["IdentitiesOnly=yes", f"IdentityFile={self.secrets.ssh_key}"]
        return shlex.join(["ssh", *(part for option in options for part in ("-o", option))])

    @property
    def public_url(self) -> str:
        return self.secrets.redact(self.url)

    async def _git(self, *args: str, timeout: float = 300.0, remote: bool = False) -> str:
        """Run git on the mirror; ``remote`` calls get the credentials (in git's environment)."""
        argv = ["git", "-c", "protocol.ext.allow=never", f"--git-dir={self.mirror}", *args]
        env = {**_GIT_ENV, "GIT_SSH_COMMAND": self.ssh_command(),
               **(self.secrets.git_environment(self.url) if remote else {})}
        try:
            return (await run(argv, env=env, timeout=timeout)).stdout
        except CommandError as exc:
            reason = exc.reason
            if "Host key verification failed" in exc.output:
                reason = f"ssh: Host key verification failed: {_HOST_KEY_HINT}"
            raise RepositoryError(self.secrets.redact(f"git {args[0]}: {reason}")) from None

    async def remote_head(self) -> str | None:
        """The commit the remote branch points at (one round trip, no fetch), or None."""
        if not self.url:
            raise RepositoryError("no repository configured (repository.url / TEAM_REPO_URL)")
        out = await self._git("ls-remote", "--end-of-options", self.url, f"refs/heads/{self.branch}",
                              timeout=60, remote=True)
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            if name == f"refs/heads/{self.branch}" and _HEX.fullmatch(sha):
                return sha
        return None

    async def fetch(self) -> None:
        """Bring the mirror up to date with the remote's branches and tags."""
        if not self.url:
            raise RepositoryError("no repository configured (repository.url / TEAM_REPO_URL)")
        if not (self.mirror / "HEAD").exists():
            self.mirror.parent.mkdir(parents=True, exist_ok=True)
            await self._git("init", "--quiet", "--bare")
        await self._git("fetch", "--quiet", "--prune", "--force", "--no-write-fetch-head",
                        "--end-of-options", self.url,
                        "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*",
                        remote=True)

    async def _rev_parse(self, name: str) -> str | None:
        argv = ["git", f"--git-dir={self.mirror}", "rev-parse", "--verify", "--quiet",
                "--end-of-options", f"{name}^{{commit}}"]
        result = await run(argv, env=_GIT_ENV, check=False, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else None

    async def resolve(self, ref: str = "") -> Commit:
        """Fetch, then find the commit ``ref`` names (the branch head when ref is empty)."""
        validate_ref(ref)
        if re.fullmatch(r"[0-9a-f]{40}", ref) and (self.mirror / "HEAD").exists():
            known = await self._rev_parse(ref)
            if known:
                return await self.commit(known)  # a commit never changes: no need to fetch
        await self.fetch()
        wanted = ref or self.branch
        candidates = [f"refs/remotes/origin/{wanted}", f"refs/tags/{wanted}"]
        if _HEX.fullmatch(wanted):
            candidates.append(wanted)
        for candidate in candidates:
            sha = await self._rev_parse(candidate)
            if sha:
                return await self.commit(sha)
        if not ref:
            raise UnknownRef(f"branch {self.branch!r} does not exist in {self.public_url}")
        raise UnknownRef(f"{ref!r} is no branch, tag or commit of {self.public_url}")

    async def commit(self, sha: str) -> Commit:
        out = await self._git("log", "-1", "--format=%H%x00%s%x00%an <%ae>%x00%ct",
                              "--end-of-options", sha)
        full, subject, author, timestamp = out.rstrip("\n").split("\0")
        return Commit(full, subject, author, int(timestamp))

    async def export(self, sha: str, destination: Path) -> None:
        """Write the tree of commit ``sha`` into the (new, empty) directory ``destination``."""
        archive = destination.with_name(destination.name + ".tar")
        try:
            await self._git("archive", "--format=tar", f"--output={archive}",
                            "--end-of-options", sha)
            try:
                await run(["tar", "-x", "--no-same-owner", "--no-same-permissions",
                           "-f", str(archive), "-C", str(destination)], timeout=300)
            except CommandError as exc:
                raise RepositoryError(f"unpacking {sha[:12]}: {exc.reason}") from None
        finally:
            archive.unlink(missing_ok=True)
