"""The releases on disk as the deployment records describe them: which one a rollback names,
which one needs no git, and which ones (with their environments and records) to keep."""

from __future__ import annotations

import logging
import re

from bluegreen.history import History, HistoryError
from bluegreen.log import fields
from bluegreen.refusals import NoRollbackTarget
from bluegreen.release.releases import Releases
from bluegreen.release.repository import Commit
from bluegreen.release.venvs import Venvs

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, history: History, releases: Releases, environments: Venvs) -> None:
        self.history = history
        self.releases = releases
        self.environments = environments

    def on_disk(self, ref: str) -> Commit | None:
        """The commit ``ref`` names if it is a release on disk, described by its records: a
        rollback, a recovery or a start-up deploy needs no git (the remote may have dropped
        the commit by a force-push, and the mirror with it)."""
        if not re.fullmatch(r"[0-9a-f]{40}", ref) or not self.releases.exists(ref):
            return None
        record = self.history.newest_of(ref)
        if record is None:
            return None
        return Commit(ref, record.subject, record.author, timestamp=0)

    def rollback_commit(self, target: str, serving: str) -> str:
        """The release a rollback to ``target`` deploys: "" the previous good one before
        ``serving``, else a deployment id or a commit (7 digits or more)."""
        if target == "":
            previous = self.history.rollback_target(serving)
            if previous is None or not self.releases.exists(previous.commit):
                raise NoRollbackTarget("no earlier good release is on disk to roll back to")
            return previous.commit
        if re.fullmatch(r"[0-9a-f]{7,40}", target):
            matches = [sha for sha in self.releases.on_disk() if sha.startswith(target)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise NoRollbackTarget(f"{target!r} names several releases; give more digits")
        if target.isdigit():
            try:
                record = self.history.get(int(target))
            except KeyError:
                raise NoRollbackTarget(f"no deployment {target}") from None
            if not record.commit or not self.releases.exists(record.commit):
                raise NoRollbackTarget(f"the release of deployment {target} is no longer on disk")
            return record.commit
        raise NoRollbackTarget(f"{target!r} is neither a deployment id nor a release on disk")

    def tidy(self, succeeded: bool, serving: str, keep: int, history_limit: int) -> None:
        """After a deployment: keep what ``retain`` says after one that ``succeeded``; after
        another, drop the environments its build left (deploys that keep failing, each with
        other dependencies, must not pile them up)."""
        try:
            if succeeded:
                self.retain(serving, keep, history_limit)
            else:
                self.prune_environments()
        except OSError as exc:
            log.error("old releases and environments stay for now: %s", exc)

    def retain(self, serving: str, keep: int, history_limit: int) -> None:
        """Keep ``keep`` releases (plus the ``serving`` one and the rollback target) and
        ``history_limit`` records."""
        target = self.history.rollback_target(serving)
        protected = {serving} | ({target.commit} if target else set())
        for sha in self.releases.prune(self.history.succeeded_commits(), keep, protected):
            log.info("deleted release %s (release.keep = %d)", sha[:12], keep,
                     extra=fields(release=sha))
        self.prune_environments()
        try:
            self.history.prune(history_limit, serving)
        except HistoryError as exc:
            log.error("%s; old records stay for now", exc)

    def prune_environments(self) -> None:
        in_use = self.environments.used_by(map(self.releases.path, self.releases.on_disk()))
        for key in self.environments.prune(in_use):
            log.info("deleted environment %s: no release on disk uses it", key)
