"""The background worker: takes queued jobs one at a time and uppercases their text.

Runs until SIGTERM or SIGINT, then finishes the job in hand and exits 0. Several workers (the
old and the new release's, during a switch) may run at once: a job is claimed by one atomic
UPDATE, so no job is done twice. Each worker keeps a heartbeat row up to date.
"""

import logging
import os
import signal
import socket
import threading
import time

from models import Heartbeat, Job, make_engine, now
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

RELEASE = os.environ.get("BLUEGREEN_RELEASE", "dev")
POLL_SECONDS = float(os.environ.get("WORKER_POLL_SECONDS", "0.5"))
WORK_SECONDS = float(os.environ.get("WORKER_WORK_SECONDS", "0.2"))  # pretend the job is work
HEARTBEAT_SECONDS = 2.0
NAME = f"{socket.gethostname()}:{os.getpid()}"

log = logging.getLogger("worker")
stop = threading.Event()


def heartbeat(sessions: sessionmaker, state: str, jobs_done: int) -> None:
    values = {"release": RELEASE, "pid": os.getpid(), "state": state, "beat_at": now(),
              "jobs_done": jobs_done}
    with sessions.begin() as db:
        if db.execute(update(Heartbeat).where(Heartbeat.worker == NAME).values(**values)).rowcount == 0:
            db.add(Heartbeat(worker=NAME, **values))


def claim(sessions: sessionmaker) -> Job | None:
    """Mark the oldest queued job as ours, in one statement; None when there is none."""
    oldest = select(Job.id).where(Job.state == "queued").order_by(Job.id).limit(1).scalar_subquery()
    with sessions.begin() as db:
        return db.scalars(
            update(Job).where(Job.id == oldest, Job.state == "queued")
            .values(state="running", worker=NAME).returning(Job)).first()


def finish(sessions: sessionmaker, job: Job) -> None:
    time.sleep(WORK_SECONDS)
    with sessions.begin() as db:
        db.execute(update(Job).where(Job.id == job.id).values(
            state="done", result=job.text.upper(), processed_by=RELEASE, done_at=now()))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stop.set())
    sessions = sessionmaker(make_engine(), expire_on_commit=False)
    log.info("worker %s of release %s started", NAME, RELEASE)
    done = 0
    last_beat = 0.0
    while not stop.is_set():
        if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
            heartbeat(sessions, "running", done)
            last_beat = time.monotonic()
        job = claim(sessions)
        if job is None:
            stop.wait(POLL_SECONDS)
            continue
        finish(sessions, job)  # a SIGTERM now waits for this job to be done
        done += 1
        log.info("job %d done", job.id)
    heartbeat(sessions, "stopped", done)
    log.info("worker %s stopped after %d jobs", NAME, done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
