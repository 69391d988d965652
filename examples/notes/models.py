"""The database: where it is, how to connect, and the tables (the migrations create them).

The web instances of two releases and the worker share one SQLite file during a switch, so
every connection uses WAL (readers never wait for the writer) and waits for a lock instead of
failing at once.
"""

import os
from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

BUSY_TIMEOUT_SECONDS = 15


def database_url() -> str:
    """DATABASE_URL, or notes.db in the data directory bluegreen gives the app."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    data_dir = os.environ.get("BLUEGREEN_DATA_DIR")
    if not data_dir:
        raise RuntimeError("set DATABASE_URL, or BLUEGREEN_DATA_DIR for the default SQLite file")
    return "sqlite:///" + os.path.join(os.path.abspath(data_dir), "notes.db")


def make_engine(url: str | None = None) -> Engine:
    url = url or database_url()
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    release: Mapped[str] = mapped_column(String(64), default="")

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "text": self.text, "created_at": self.created_at.isoformat(),
                "release": self.release}


class Job(Base):
    """Work for the worker: uppercase ``text`` into ``result``."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    result: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    processed_by: Mapped[str | None] = mapped_column(String(64))  # the worker's release
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "text": self.text, "state": self.state,
                "result": self.result, "worker": self.worker, "processed_by": self.processed_by,
                "created_at": self.created_at.isoformat(),
                "done_at": self.done_at.isoformat() if self.done_at else None}


class Heartbeat(Base):
    """One row per worker process, updated while it runs."""

    __tablename__ = "heartbeats"

    worker: Mapped[str] = mapped_column(String(128), primary_key=True)
    release: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # running, stopped
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)

    def to_dict(self) -> dict[str, object]:
        return {"worker": self.worker, "release": self.release, "pid": self.pid, "state": self.state,
                "beat_at": self.beat_at.isoformat(), "jobs_done": self.jobs_done}
