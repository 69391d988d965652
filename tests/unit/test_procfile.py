from __future__ import annotations

from pathlib import Path

import pytest

from bluegreen.release import procfile
from bluegreen.release.procfile import ProcfileError


def test_parse_skips_comments_and_blank_lines() -> None:
    text = "# processes\nweb: gunicorn app:app\n\nworker:  rq worker tasks  \nrelease: flask db upgrade\n"
    assert procfile.parse(text) == {"web": "gunicorn app:app", "worker": "rq worker tasks",
                                    "release": "flask db upgrade"}


@pytest.mark.parametrize("text, problem", [
    ("worker rq worker\n", "expected 'name: command'"),
    ("worker:\n", "expected 'name: command'"),
    ("worker: a\nworker: b\n", "appears twice"),
    ("-worker: a\n", "not a process name"),
])
def test_parse_names_the_line(text: str, problem: str) -> None:
    with pytest.raises(ProcfileError, match=problem) as error:
        procfile.parse(text)
    assert "Procfile:" in str(error.value)


def test_processes_merge_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: gunicorn app:app\nrelease: alembic upgrade head\n"
                                       "worker: python worker.py\nclock: python clock.py\n")
    found = procfile.processes(tmp_path, "", {"clock": "", "mailer": "python mail.py"})
    assert found.release == "alembic upgrade head"
    assert dict(found.workers) == {"mailer": "python mail.py", "worker": "python worker.py"}
    assert procfile.processes(tmp_path, "flask db upgrade", {}).release == "flask db upgrade"
    assert found.web == "app:app"


def test_no_procfile_means_no_release_phase_and_no_workers(tmp_path: Path) -> None:
    found = procfile.processes(tmp_path, "", {})
    assert found.release == ""
    assert dict(found.workers) == {}
    assert found.web == ""


@pytest.mark.parametrize("command, app", [
    ("gunicorn app:app", "app:app"),
    ("gunicorn --bind 0.0.0.0:$PORT mysite.wsgi", "mysite.wsgi:application"),  # gunicorn's default
    ('gunicorn -w 4 -b :8000 "app:create_app()" --preload', "app:create_app()"),
    ("python -m gunicorn -k gthread --threads 4 shop.wsgi:application", "shop.wsgi:application"),
    ("exec gunicorn --bind=0.0.0.0:$PORT --log-file - app:app", "app:app"),
    ("WEB_CONCURRENCY=3 .venv/bin/gunicorn -c conf.py service:api", "service:api"),
    ("gunicorn --config gunicorn.conf.py", ""),  # the app is in the config file: not read
    ("python app.py", ""),
    ("uwsgi --http :8000 --module app:app", ""),
    ("gunicorn 'unclosed", ""),
])
def test_the_web_lines_gunicorn_names_the_app(command: str, app: str) -> None:
    assert procfile.web_app(command) == app
