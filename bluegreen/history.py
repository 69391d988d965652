"""Deployment records, kept in SQLite under the state directory.

Every change is one transaction, so a crash or a full disk leaves the previous content intact.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class HistoryError(Exception):
    """The records could not be written (a full disk, say); nothing was half-written."""


class State(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SWITCHED_BACK = "switched-back"  # after the switch, traffic went back to the old instance
    INTERRUPTED = "interrupted"


class Trigger(StrEnum):
    STARTUP = "startup"
    REFRESHER = "refresher"
    HTTP = "http"
    DBUS = "dbus"
    CLI = "cli"
    ROLLBACK = "rollback"
    RECOVERY = "recovery"


class Step(StrEnum):
    """The steps of a deploy, in order."""

    RESOLVE = "resolve"
    MATERIALIZE = "materialize"
    VERIFY = "verify"
    MIGRATE = "migrate"
    START = "start"
    HEALTH = "health"
    CANARY = "canary"  # the new release takes a share of the traffic first (canary.py)
    SWITCH = "switch"
    DRAIN = "drain"
    WATCH = "watch"
    SWITCH_BACK = "switch-back"
    WORKERS = "workers"
    STOP_OLD = "stop-old"


@dataclass(frozen=True)
class StepTiming:
    step: str
    started: float
    finished: float | None = None


@dataclass(frozen=True)
class Deployment:
    id: int
    ref: str
    trigger: str
    state: str
    started_at: float
    commit: str = ""
    subject: str = ""
    author: str = ""
    port: int = 0
    previous_port: int = 0
    previous_release: str = ""
    finished_at: float | None = None
    failed_step: str = ""
    reason: str = ""
    steps: tuple[StepTiming, ...] = field(default_factory=tuple)
    # What became of each step of the Procfile's chained web line (release/procfile.py).
    web_steps: tuple[str, ...] = ()

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at



SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    commit_sha TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '',
    port INTEGER NOT NULL DEFAULT 0,
    previous_port INTEGER NOT NULL DEFAULT 0,
    previous_release TEXT NOT NULL DEFAULT '',
    finished_at REAL,
    failed_step TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    steps TEXT NOT NULL DEFAULT '[]',
    web_steps TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS deployments_state ON deployments (state);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Releases whose release phase ran to its end on this host: kept when their records are pruned.
CREATE TABLE IF NOT EXISTS release_phases (
    commit_sha TEXT PRIMARY KEY,
    deployment_id INTEGER NOT NULL,
    finished_at REAL NOT NULL
);
"""

# A record whose steps go on past the release phase ran it to its end (a failed one ends there).
_PAST_RELEASE_PHASE = (f'steps LIKE \'%"step": "{Step.MIGRATE}"%\' '
                       f'AND steps LIKE \'%"step": "{Step.START}"%\'')

_COLUMNS = ("id, ref, trigger, state, started_at, commit_sha, subject, author, port, "
            "previous_port, previous_release, finished_at, failed_step, reason, steps, web_steps")


# The former names of the switch back's state and step.
_FORMER_STATE = "rolled-back"
_FORMER_STEP = "rollback"


def _row(row: tuple[Any, ...]) -> Deployment:
    (id_, ref, trigger, state, started_at, commit, subject, author, port, previous_port,
     previous_release, finished_at, failed_step, reason, steps, web_steps) = row
    return Deployment(
        id=id_, ref=ref, trigger=trigger, state=state, started_at=started_at, commit=commit,
        subject=subject, author=author, port=port, previous_port=previous_port,
        previous_release=previous_release, finished_at=finished_at, failed_step=failed_step,
        reason=reason, steps=tuple(StepTiming(**s) for s in json.loads(steps)),
        web_steps=tuple(json.loads(web_steps)),
    )


class History:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA journal_size_limit=1048576")  # the WAL shrinks back after checkpoints
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(deployments)")}
        if "web_steps" not in columns:  # records written before it was kept
            self.db.execute("ALTER TABLE deployments ADD COLUMN web_steps TEXT NOT NULL DEFAULT '[]'")
        self.db.execute("INSERT OR IGNORE INTO release_phases (commit_sha, deployment_id, finished_at) "
                        "SELECT commit_sha, MIN(id), MIN(started_at) FROM deployments "
                        f"WHERE {_PAST_RELEASE_PHASE} GROUP BY commit_sha")
        try:
            self._rename_switch_back()
        except HistoryError as exc:
            log.warning("%s; records keep the old step and state names until the next start", exc)

    def _rename_switch_back(self) -> None:
        """Give records of the automatic switch back written under its former name, the one of
        a redeploy of an older release (step "rollback", state "rolled-back"), its own name."""
        query = ("SELECT id, state, failed_step, steps FROM deployments "
                 "WHERE state = ? OR failed_step = ? OR steps LIKE ?")
        old = (_FORMER_STATE, _FORMER_STEP, f'%"{_FORMER_STEP}"%')
        if self.db.execute(query, old).fetchone() is None:
            return
        with self._transaction() as db:
            for id_, state, failed_step, steps in db.execute(query, old).fetchall():
                timings = json.loads(steps)
                for timing in timings:
                    if timing["step"] == _FORMER_STEP:
                        timing["step"] = str(Step.SWITCH_BACK)
                db.execute(
                    "UPDATE deployments SET state = ?, failed_step = ?, steps = ? WHERE id = ?",
                    (str(State.SWITCHED_BACK) if state == _FORMER_STATE else state,
                     str(Step.SWITCH_BACK) if failed_step == _FORMER_STEP else failed_step,
                     json.dumps(timings), id_))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failed write (sqlite3.Error) becomes HistoryError."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot write the deployment records ({self.path}): {exc}") from None
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise HistoryError(f"cannot write the deployment records ({self.path}): {exc}") from None
            raise

    def begin(self, ref: str, trigger: Trigger, *, commit: str = "", subject: str = "",
              author: str = "", previous_port: int = 0, previous_release: str = "",
              now: float | None = None) -> Deployment:
        now = time.time() if now is None else now
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO deployments (ref, trigger, state, started_at, commit_sha, subject, "
                "author, previous_port, previous_release) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ref, str(trigger), str(State.RUNNING), now, commit, subject, author,
                 previous_port, previous_release))
            assert cursor.lastrowid is not None
            new_id = cursor.lastrowid
        return self.get(new_id)

    def get(self, deployment_id: int) -> Deployment:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM deployments WHERE id = ?",
                              (deployment_id,)).fetchone()
        if row is None:
            raise KeyError(deployment_id)
        return _row(row)

    def save(self, deployment: Deployment) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE deployments SET state = ?, commit_sha = ?, subject = ?, author = ?, "
                "port = ?, previous_port = ?, previous_release = ?, finished_at = ?, "
                "failed_step = ?, reason = ?, steps = ?, web_steps = ? WHERE id = ?",
                (deployment.state, deployment.commit, deployment.subject, deployment.author,
                 deployment.port, deployment.previous_port, deployment.previous_release,
                 deployment.finished_at, deployment.failed_step, deployment.reason,
                 json.dumps([asdict(s) for s in deployment.steps]),
                 json.dumps(list(deployment.web_steps)), deployment.id))
            if _past_release_phase(deployment):
                db.execute("INSERT OR IGNORE INTO release_phases (commit_sha, deployment_id, "
                           "finished_at) VALUES (?, ?, ?)",
                           (deployment.commit, deployment.id, _step_end(deployment, Step.MIGRATE)))

    def recent(self, limit: int = 20) -> list[Deployment]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM deployments ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()
        return [_row(row) for row in rows]

    def last_succeeded(self) -> Deployment | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM deployments WHERE state = ? "
                              "ORDER BY id DESC LIMIT 1", (str(State.SUCCEEDED),)).fetchone()
        return _row(row) if row else None

    def succeeded_commits(self, limit: int = 1000) -> list[str]:
        """Commits of successful deployments, most recently deployed first."""
        rows = self.db.execute(
            "SELECT commit_sha FROM deployments WHERE state = ? GROUP BY commit_sha "
            "ORDER BY MAX(id) DESC LIMIT ?", (str(State.SUCCEEDED), limit)).fetchall()
        return [row[0] for row in rows]

    def release_phase_ran(self, commit: str) -> bool:
        """Whether the release phase of ``commit`` ran to its end on this host."""
        return self.db.execute("SELECT 1 FROM release_phases WHERE commit_sha = ?",
                               (commit,)).fetchone() is not None

    def served(self, commit: str) -> bool:
        """Whether a deployment of ``commit`` ever succeeded here."""
        return self.db.execute("SELECT 1 FROM deployments WHERE commit_sha = ? AND state = ?",
                               (commit, str(State.SUCCEEDED))).fetchone() is not None

    def newest_of(self, commit: str) -> Deployment | None:
        """The newest record of a deployment of ``commit`` that got as far as resolving it."""
        row = self.db.execute(f"SELECT {_COLUMNS} FROM deployments WHERE commit_sha = ? "
                              "ORDER BY id DESC LIMIT 1", (commit,)).fetchone()
        return _row(row) if row else None

    def rollback_target(self, serving: str) -> Deployment | None:
        """The newest successful deployment of a release other than the serving one."""
        row = self.db.execute(f"SELECT {_COLUMNS} FROM deployments WHERE state = ? AND commit_sha != ? "
                              "ORDER BY id DESC LIMIT 1", (str(State.SUCCEEDED), serving)).fetchone()
        return _row(row) if row else None

    def prune(self, keep: int, serving: str = "") -> int:
        """Delete all but the newest ``keep`` records; return how many. Never a running one,
        nor those a start-up or a rollback reads: the last successful deployment and the
        rollback target (while ``serving`` serves)."""
        needed = [record.id for record in (self.last_succeeded(), self.rollback_target(serving))
                  if record is not None]
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM deployments WHERE state != ? AND id <= "
                "(SELECT MAX(id) FROM deployments) - ? "
                f"AND id NOT IN ({', '.join('?' * len(needed))})",
                (str(State.RUNNING), keep, *needed))
            return cursor.rowcount

    # The controller's own values kept with the records (the refresher's seen head, the
    # settings the serving release was deployed with), by key. The table keeps its first name.

    def get_value(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_value(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def mark_interrupted(self, reason: str, now: float | None = None) -> list[Deployment]:
        """Close the records of deployments a dead controller left running."""
        now = time.time() if now is None else now
        running = [_row(r) for r in self.db.execute(
            f"SELECT {_COLUMNS} FROM deployments WHERE state = ?", (str(State.RUNNING),))]
        for deployment in running:
            self.save(replace(deployment, state=State.INTERRUPTED, finished_at=now,
                              reason=reason))
        return running


def _past_release_phase(deployment: Deployment) -> bool:
    names = [timing.step for timing in deployment.steps]
    return Step.MIGRATE in names and Step.START in names[names.index(Step.MIGRATE):]


def _step_end(deployment: Deployment, step: Step) -> float:
    timing = next(timing for timing in deployment.steps if timing.step == step)
    return timing.finished or timing.started


def with_step(deployment: Deployment, step: Step, now: float | None = None) -> Deployment:
    """The record with ``step`` begun (and the step before it finished)."""
    now = time.time() if now is None else now
    steps = [replace(s, finished=now) if s.finished is None else s for s in deployment.steps]
    steps.append(StepTiming(str(step), now))
    return replace(deployment, steps=tuple(steps))


def finished(deployment: Deployment, state: State, *, failed_step: str = "", reason: str = "",
             now: float | None = None) -> Deployment:
    now = time.time() if now is None else now
    steps = tuple(replace(s, finished=now) if s.finished is None else s for s in deployment.steps)
    return replace(deployment, state=state, finished_at=now, failed_step=failed_step,
                   reason=reason, steps=steps)
