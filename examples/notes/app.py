"""Notes: a small Flask app that keeps notes in a database and hands slow work to a worker.

Settings come from the environment:
  SECRET_KEY     required; signs Flask's sessions (never logged or shown, only its fingerprint)
  DATABASE_URL   optional; default: SQLite file notes.db in $BLUEGREEN_DATA_DIR
  TRUSTED_HOSTS  optional; comma-separated Host names the app answers (default: any)
"""

import functools
import hashlib
import os

from flask import Flask, abort, request
from models import Heartbeat, Job, Note, make_engine
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker
from werkzeug.exceptions import HTTPException

APP_VERSION = "1"
RELEASE = os.environ.get("BLUEGREEN_RELEASE", "dev")
MAX_TEXT = 10_000

secret_key = os.environ.get("SECRET_KEY", "")
if not secret_key:
    raise RuntimeError("SECRET_KEY is not set: the app refuses to start without it")
# Shows that the right secret arrived without showing the secret.
SECRET_FINGERPRINT = hashlib.sha256(secret_key.encode()).hexdigest()[:12]

app = Flask(__name__)
app.config["SECRET_KEY"] = secret_key
app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
if os.environ.get("TRUSTED_HOSTS"):
    app.config["TRUSTED_HOSTS"] = [h.strip() for h in os.environ["TRUSTED_HOSTS"].split(",") if h.strip()]
del secret_key

engine = make_engine()  # connects at the first request, not at import
Sessions = sessionmaker(engine, expire_on_commit=False)


@functools.cache
def schema_at_first_request() -> str | None:
    """The schema revision this process found when it was first asked (its first health
    check): the release phase must have migrated before then."""
    from alembic.runtime.migration import MigrationContext  # only here: import app stays quick

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def text_from_body() -> str:
    body = request.get_json(silent=True)
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        abort(400, description='expected a JSON object {"text": "..."}')
    if len(text) > MAX_TEXT:
        abort(400, description=f"text longer than {MAX_TEXT} characters")
    return text


@app.errorhandler(HTTPException)
def http_error(error: HTTPException):
    return {"error": error.name, "message": error.description}, error.code


@app.get("/health")
def health():
    try:
        schema_at_first_request()
        with Sessions() as db:
            db.execute(select(Note).limit(1)).all()
    except SQLAlchemyError as error:
        app.logger.warning("health check failed: %s", error.__class__.__name__)
        return {"status": "unavailable", "reason": error.__class__.__name__}, 503
    return {"status": "ok", "version": APP_VERSION, "release": RELEASE}


@app.get("/")
def index():
    with Sessions() as db:
        count = db.scalar(select(func.count()).select_from(Note))
    return {
        "app": "notes",
        "version": APP_VERSION,
        "release": RELEASE,
        "notes": count,
        "schema": schema_at_first_request(),
        "server": request.environ.get("SERVER_SOFTWARE", ""),
        "secret_fingerprint": SECRET_FINGERPRINT,
    }


@app.post("/notes")
def create_note():
    note = Note(text=text_from_body(), release=RELEASE)
    with Sessions.begin() as db:
        db.add(note)
    return {"id": note.id}, 201


@app.get("/notes/<int:note_id>")
def get_note(note_id: int):
    with Sessions() as db:
        note = db.get(Note, note_id)
        if note is None:
            abort(404, description=f"no note {note_id}")
        return note.to_dict()


@app.post("/jobs")
def create_job():
    job = Job(text=text_from_body())
    with Sessions.begin() as db:
        db.add(job)
    return {"id": job.id, "state": job.state}, 202


@app.get("/jobs/<int:job_id>")
def get_job(job_id: int):
    with Sessions() as db:
        job = db.get(Job, job_id)
        if job is None:
            abort(404, description=f"no job {job_id}")
        return job.to_dict()


@app.get("/workers")
def workers():
    with Sessions() as db:
        beats = db.scalars(select(Heartbeat).order_by(Heartbeat.beat_at.desc()).limit(20)).all()
        return {"workers": [beat.to_dict() for beat in beats]}
