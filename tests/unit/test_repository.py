from __future__ import annotations

import asyncio
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluegreen.credentials import Secrets
from bluegreen.release.releases import Releases
from bluegreen.release.repository import InvalidRef, Repository, RepositoryError, UnknownRef, validate_ref

IDENTITY = ["-c", "user.name=T", "-c", "user.email=t@example.com"]


@pytest.mark.parametrize("ref", ["", "main", "release/2024-01", "v1.2.3", "deadbeef", "a" * 40,
                                 "feature_x"])
def test_plain_refs_are_accepted(ref: str) -> None:
    assert validate_ref(ref) == ref


@pytest.mark.parametrize("ref", ["../x", "--upload-pack=touch /tmp/pwned", "-x", "/etc/passwd",
                                 "a..b", "main@{1}", "a b", "x;rm -rf /", "refs/heads/", ".hidden",
                                 "x.lock", "a//b", "a/.b", "$(id)", "a\nb", "ä"])
def test_refs_that_look_like_paths_options_or_ranges_are_refused(ref: str) -> None:
    with pytest.raises(InvalidRef):
        validate_ref(ref)


@given(st.text(max_size=60))
def test_a_validated_ref_can_never_be_read_as_an_option_or_path(ref: str) -> None:
    try:
        validate_ref(ref)
    except InvalidRef:
        return
    assert not ref.startswith(("-", "/", "."))
    assert ".." not in ref and all(c.isascii() and not c.isspace() for c in ref)


@pytest.fixture()
def origin(tmp_path: Path) -> Path:
    work = tmp_path / "origin"
    work.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", *IDENTITY, *args], cwd=work, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    (work / "app.py").write_text("app = None\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    git("tag", "v1")
    (work / "app.py").write_text("app = 2\n")
    git("commit", "-q", "-am", "second")
    git("checkout", "-q", "-b", "other")
    return work


def head(work: Path, ref: str) -> str:
    return subprocess.run(["git", "rev-parse", ref], cwd=work, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_resolve_branch_tag_and_commit(origin: Path, tmp_path: Path) -> None:
    repository = Repository(str(origin), "main", tmp_path / "mirror.git")
    commit = asyncio.run(repository.resolve(""))
    assert commit.sha == head(origin, "main")
    assert commit.subject == "second" and commit.author == "T <t@example.com>"
    assert asyncio.run(repository.resolve("v1")).sha == head(origin, "v1")
    assert asyncio.run(repository.resolve(head(origin, "v1")[:10])).sha == head(origin, "v1")
    assert asyncio.run(repository.resolve("other")).sha == head(origin, "other")


def test_unknown_refs_and_remotes_are_errors(origin: Path, tmp_path: Path) -> None:
    repository = Repository(str(origin), "main", tmp_path / "mirror.git")
    with pytest.raises(UnknownRef, match="no branch, tag or commit"):
        asyncio.run(repository.resolve("nope"))
    broken = Repository(str(tmp_path / "missing"), "main", tmp_path / "other.git")
    with pytest.raises(RepositoryError, match="git fetch"):
        asyncio.run(broken.resolve(""))


def test_materialize_writes_the_tree_once_and_completely(origin: Path, tmp_path: Path) -> None:
    repository = Repository(str(origin), "main", tmp_path / "mirror.git")
    releases = Releases(tmp_path / "releases")
    sha = asyncio.run(repository.resolve("v1")).sha
    staging = asyncio.run(releases.stage(repository, sha))
    assert staging.name.startswith(".") and not releases.exists(sha)
    path = releases.publish(staging, sha)
    assert path == tmp_path / "releases" / sha and not staging.exists()
    assert (path / "app.py").read_text() == "app = None\n"
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == [sha]
    (tmp_path / "releases" / ".abc.partial").mkdir()
    releases.remove_incomplete()
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == [sha]


def test_ssh_trusts_only_the_pinned_host_keys_and_the_key_credential(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds/ssh-key").write_text("not a real key\n")
    secrets = Secrets.load({"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert secrets.ssh_key == tmp_path / "creds/ssh-key"
    known = tmp_path / "known hosts"
    argv = shlex.split(Repository("ssh://git@h/x.git", "main", tmp_path / "m.git", secrets,
                                  known).ssh_command())
    options = [argv[i + 1] for i in range(1, len(argv), 2) if argv[i] == "-o"]
    assert argv[0] == "ssh" and len(options) * 2 + 1 == len(argv)
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={known}",
            "IdentitiesOnly=yes", f"IdentityFile={tmp_path / 'creds/ssh-key'}"} <= set(options)
    without_key = Repository("ssh://git@h/x.git", "main", tmp_path / "m.git", Secrets.load({}))
    assert "IdentityFile" not in without_key.ssh_command()
    assert f"UserKnownHostsFile={tmp_path / 'ssh_known_hosts'}" in without_key.ssh_command()


def test_an_unknown_host_key_says_how_to_pin_it(tmp_path: Path) -> None:
    ssh = tmp_path / "ssh"  # stands in for ssh: refuses the host as ssh would
    ssh.write_text("#!/bin/sh\necho 'Host key verification failed.' >&2\nexit 255\n")
    ssh.chmod(0o755)
    repository = Repository("ssh://git@203.0.113.1/x.git", "main", tmp_path / "m.git")
    repository.ssh_command = lambda: str(ssh)  # type: ignore[method-assign]
    with pytest.raises(RepositoryError, match=r"repository\.ssh_known_hosts"):
        asyncio.run(repository.remote_head())
