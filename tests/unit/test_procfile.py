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


@pytest.mark.parametrize("command, app", [
    ("uvicorn main:app --host 0.0.0.0 --port $PORT", "main:app"),
    ("python -m uvicorn --workers 2 service.main:app", "service.main:app"),
    ("uvicorn --factory service:create_app", "service:create_app()"),
    ("uvicorn mysite.asgi:application --proxy-headers", "mysite.asgi:application"),
    ("gunicorn -k uvicorn.workers.UvicornWorker main:app", "main:app"),
    ("gunicorn main:app --worker-class uvicorn_worker.UvicornWorker -w 4", "main:app"),
    ("gunicorn --worker-class=uvicorn.workers.UvicornH11Worker -b :8000 main:app", "main:app"),
    ("exec uvicorn --app-dir src main:app", "main:app"),  # imported from src: web_dir
    ("gunicorn -k gthread main:app", ""),  # WSGI
    # FastAPI's own command: a file, its app found by name (app unless --app says otherwise).
    ("fastapi run main.py --port $PORT", "main:app"),
    ("fastapi run --host 0.0.0.0 --app api service/main.py", "service.main:api"),
    ("fastapi run", ""),  # it would search: not guessed
    ("fastapi dev main.py", ""),
    # Other ASGI servers: served by uvicorn's worker all the same (which the release must pin).
    ("daphne -b 0.0.0.0 -p $PORT mysite.asgi:application", "mysite.asgi:application"),
    ("hypercorn --bind 0.0.0.0:$PORT -w 2 main:app", "main:app"),
])
def test_the_web_lines_asgi_server_names_the_asgi_app(command: str, app: str) -> None:
    assert procfile.web_asgi(command) == app
    if app:  # never taken for a WSGI app as well
        assert procfile.web_app(command) == ""


def test_processes_say_whether_the_web_line_serves_asgi(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: uvicorn main:app --port $PORT\n")
    found = procfile.processes(tmp_path, "", {})
    assert (found.web, found.asgi) == ("main:app", True)
    (tmp_path / "Procfile").write_text("web: gunicorn main:app\n")
    found = procfile.processes(tmp_path, "", {})
    assert (found.web, found.asgi) == ("main:app", False)


DJANGO_WEB = ("python manage.py migrate && python manage.py collectstatic --no-input && "
              "gunicorn myproject.wsgi --log-file -")


def test_a_chained_web_line_names_the_app_and_maps_its_other_steps(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text(f"web: {DJANGO_WEB}\n")
    found = procfile.processes(tmp_path, "", {})
    assert found.web == "myproject.wsgi:application"
    assert found.release == "python manage.py migrate"
    assert found.build == "python manage.py collectstatic --no-input"
    assert found.web_steps == (
        "python manage.py migrate -> release phase",
        "python manage.py collectstatic --no-input -> build",
        "gunicorn myproject.wsgi --log-file - -> serves myproject.wsgi:application",
    )
    assert dict(found.workers) == {}


def test_the_configuration_and_the_release_line_win_over_the_web_lines_steps(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text(
        "web: echo starting; python3 ./manage.py migrate --no-input && gunicorn myproject.wsgi\n"
        "release: ./manage.py migrate --no-input\n")
    found = procfile.processes(tmp_path, "", {}, build_command="make assets")
    assert found.release == "./manage.py migrate --no-input"
    assert found.build == ""
    assert found.web_steps == (
        "echo starting -> ignored",
        "python3 ./manage.py migrate --no-input -> ignored (the Procfile's release: line is the "
        "release phase)",
        "gunicorn myproject.wsgi -> serves myproject.wsgi:application",
    )
    overridden = procfile.processes(tmp_path, "true", {})
    assert overridden.release == "true"
    assert "ignored (release.migrate_command is the release phase)" in overridden.web_steps[1]


@pytest.mark.parametrize("command, steps", [
    ("gunicorn app:app", ["gunicorn app:app"]),
    ("a && 'b && c' ; d", ["a", "'b && c'", "d"]),
    ('echo "x;y" && gunicorn app:app', ['echo "x;y"', "gunicorn app:app"]),
    ("a || b && c", ["a || b", "c"]),
])
def test_a_web_line_splits_at_and_and_semicolon_outside_quotes(command: str, steps: list[str]) -> None:
    assert procfile.chain(command) == steps


def test_a_single_web_line_maps_nothing(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: gunicorn app:app\n")
    assert procfile.processes(tmp_path, "", {}).web_steps == ()


@pytest.mark.parametrize("step, phase", [
    ("python manage.py migrate --no-input", "release phase"),
    ("./manage.py collectstatic --noinput", "build"),
    ("python3 -m django migrate --settings=mysite.settings", "release phase"),
    ("DJANGO_SETTINGS_MODULE=mysite.prod django-admin collectstatic", "build"),
    ("flask db upgrade", "release phase"),
    ("alembic upgrade head", "release phase"),
    ("python manage.py createsuperuser --no-input", ""),
    ("python -c 'print(1)'", ""),
    ("npm run build", ""),
])
def test_the_phase_of_a_web_lines_step(step: str, phase: str) -> None:
    assert procfile.step_phase(step) == phase


def test_a_chained_web_line_that_ends_in_uvicorn_serves_asgi(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text(
        "web: python manage.py migrate && uvicorn mysite.asgi:application --port $PORT\n")
    found = procfile.processes(tmp_path, "", {})
    assert (found.web, found.asgi) == ("mysite.asgi:application", True)
    assert found.release == "python manage.py migrate"
    assert found.web_steps[-1] == ("uvicorn mysite.asgi:application --port $PORT -> serves "
                                   "mysite.asgi:application")


@pytest.mark.parametrize("web, app, directory, release", [
    ("cd backend && gunicorn config.wsgi", "config.wsgi:application", "backend", ""),
    ("gunicorn --chdir backend config.wsgi:application", "config.wsgi:application", "backend", ""),
    ("gunicorn --chdir=./backend/ config.wsgi --log-file -", "config.wsgi:application", "backend", ""),
    ("gunicorn --pythonpath backend config.wsgi", "config.wsgi:application", "backend", ""),
    ("cd backend && python manage.py migrate --no-input && gunicorn config.wsgi",
     "config.wsgi:application", "backend", "cd backend && python manage.py migrate --no-input"),
    ("cd backend; gunicorn --chdir src config.wsgi", "config.wsgi:application", "backend/src", ""),
    ("uvicorn --app-dir backend main:app --port $PORT", "main:app", "backend", ""),
    ("gunicorn config.wsgi", "config.wsgi:application", "", ""),
])
def test_a_project_in_a_subdirectory_is_imported_from_it(tmp_path: Path, web: str, app: str,
                                                         directory: str, release: str) -> None:
    (tmp_path / "backend/src").mkdir(parents=True)
    (tmp_path / "Procfile").write_text(f"web: {web}\n")
    found = procfile.processes(tmp_path, "", {})
    assert (found.web, found.web_dir, found.release) == (app, directory, release)


def test_the_web_lines_build_steps_run_in_its_directory(tmp_path: Path) -> None:
    (tmp_path / "backend").mkdir()
    (tmp_path / "Procfile").write_text(
        "web: cd backend && python manage.py collectstatic --no-input && gunicorn config.wsgi\n"
        "release: cd backend && python manage.py migrate\n")
    found = procfile.processes(tmp_path, "", {})
    assert found.build == "cd backend && python manage.py collectstatic --no-input"
    assert found.release == "cd backend && python manage.py migrate"
    assert found.web_dir == "backend"
    assert found.web_steps[0] == "cd backend -> the directory of the steps after it"
    assert found.web_steps[-1] == "gunicorn config.wsgi -> serves config.wsgi:application in backend"


@pytest.mark.parametrize("web", [
    "cd ../elsewhere && gunicorn config.wsgi",
    "cd /srv/app && gunicorn config.wsgi",
    "gunicorn --chdir missing config.wsgi",
    "gunicorn --chdir outside config.wsgi",
    "cd $APP_DIR && gunicorn config.wsgi",
])
def test_the_web_apps_directory_lies_in_the_release(tmp_path: Path, web: str) -> None:
    release = tmp_path / "release"
    release.mkdir()
    (release / "outside").symlink_to(tmp_path)
    (release / "Procfile").write_text(f"web: {web}\n")
    with pytest.raises(ProcfileError, match="web: "):
        procfile.processes(release, "", {})
