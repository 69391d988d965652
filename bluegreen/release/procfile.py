"""The app's process types: its ``Procfile`` (as Heroku, Dokku and piku read it), merged with
the ``[processes]`` table of the configuration.

``web`` is what bluegreen serves itself (gunicorn on the instance's port): a ``gunicorn``
command there names the WSGI app, used unless ``app.wsgi`` names one; its options are not
(bluegreen sets the port, workers and worker class). A ``uvicorn`` command, ``gunicorn``
with uvicorn's worker class (``uvicorn.workers.*``, ``uvicorn_worker.*``), ``fastapi run``,
``daphne`` or ``hypercorn`` names an ASGI app instead, used unless ``app.asgi`` or
``app.wsgi`` names one; bluegreen serves it with uvicorn's worker. ``release`` is the release phase
(``release.migrate_command`` wins over it); every other type is a worker.

A web line may chain steps before gunicorn (``python manage.py migrate && python manage.py
collectstatic --no-input && gunicorn mysite.wsgi``, as on Railway or Render). bluegreen never
runs the line itself, since every instance's start would then migrate: each step is mapped to
what does the same once per release (collectstatic to the build, a migration to the release
phase) or ignored, and ``Processes.web_steps`` says which, for the journal and the record.

A project in a subdirectory of the repository (``cd backend && gunicorn config.wsgi``,
``gunicorn --chdir backend ...``, uvicorn's ``--app-dir``) is imported from there:
``Processes.web_dir``, which the mapped steps run in too. It must lie in the release.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bluegreen.config import PROCESS_NAME, WSGI_APP, WSGI_MODULE

FILENAME = "Procfile"
_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*)")


class ProcfileError(Exception):
    """The Procfile cannot be used; the message names the line and the reason."""


# gunicorn's options that take a value as the next word (a value is never the app).
_VALUED = frozenset(("-b", "--bind", "-w", "--workers", "-k", "--worker-class", "-t", "--timeout",
    "-c", "--config", "--threads", "--worker-connections", "--max-requests",
    "--max-requests-jitter", "--graceful-timeout", "--keep-alive", "--limit-request-line",
    "--limit-request-fields", "--limit-request-field_size", "--backlog", "-u", "--user", "-g",
    "--group", "-m", "--umask", "--chdir", "--pythonpath", "-e", "--env", "-n", "--name",
    "--log-level", "--log-file", "--error-logfile", "--access-logfile", "--access-logformat",
    "--log-config", "--log-syslog-to", "--log-syslog-prefix", "--log-syslog-facility",
    "--statsd-host", "--statsd-prefix", "--forwarded-allow-ips", "--proxy-allow-from", "--pid",
    "-p", "--worker-tmp-dir", "--certfile", "--keyfile", "--ca-certs", "--ssl-version",
    "--ciphers", "--cert-reqs", "--paste", "--paster", "--reload-engine", "--reload-extra-file",
    "--logger-class", "--dogstatsd-tags", "--raw-env", "--header-map"))


# Steps of a chained web line that belong to a phase of their own: (what the step runs, e.g.
# Django's manage.py COMMAND or the words after a program) -> the phase.
RELEASE_PHASE, BUILD = "release phase", "build"
_DJANGO_STEPS = {"migrate": RELEASE_PHASE, "collectstatic": BUILD}
_MIGRATIONS = (("alembic", "upgrade"), ("flask", "db", "upgrade"))


@dataclass(frozen=True)
class Processes:
    release: str = ""
    workers: Mapping[str, str] = field(default_factory=dict)
    web: str = ""  # the app the web line's gunicorn or uvicorn names ("" if none)
    asgi: bool = False  # web is an ASGI app (uvicorn's)
    build: str = ""  # the web line's build steps, when release.build_command is empty
    # Each step of a chained web line and what bluegreen made of it ("STEP -> build").
    web_steps: tuple[str, ...] = ()
    # The directory of the release the web app is imported from ("": the release's own).
    web_dir: str = ""


def _command_words(command: str) -> list[str]:
    """The words of a command less what only sets its environment (VAR=value, exec)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    while words and ("=" in words[0] and not words[0].startswith("-")):
        words.pop(0)  # VAR=value before the command
    if words[:1] == ["exec"]:
        words.pop(0)
    return words


# uvicorn's options that take a value as the next word.
_UVICORN_VALUED = frozenset(("--host", "--port", "--uds", "--fd", "--reload-dir", "--reload-include",
    "--reload-exclude", "--reload-delay", "--workers", "--loop", "--http", "--ws", "--ws-max-size",
    "--ws-max-queue", "--ws-ping-interval", "--ws-ping-timeout", "--ws-per-message-deflate",
    "--lifespan", "--interface", "--env-file", "--log-config", "--log-level", "--root-path",
    "--limit-concurrency", "--backlog", "--limit-max-requests", "--timeout-keep-alive",
    "--timeout-graceful-shutdown", "--ssl-keyfile", "--ssl-certfile", "--ssl-keyfile-password",
    "--ssl-version", "--ssl-cert-reqs", "--ssl-ca-certs", "--ssl-ciphers", "--header",
    "--forwarded-allow-ips", "--app-dir", "--h11-max-incomplete-event-size",
    "--timeout-worker-healthcheck"))
_UVICORN_WORKERS = ("uvicorn.workers.", "uvicorn_worker.")
# Other ASGI servers' options that take a value: what they serve, uvicorn's worker serves.
_ASGI_VALUED = {
    "daphne": frozenset(("-b", "--bind", "-p", "--port", "-u", "--unix-socket", "--fd", "-e",
        "--endpoint", "-v", "--verbosity", "-t", "--http-timeout", "--access-log", "--log-fmt",
        "--ping-interval", "--ping-timeout", "--application-close-timeout", "--root-path",
        "--proxy-headers-host", "--proxy-headers-port", "-s", "--server-name",
        "--websocket_timeout", "--websocket_connect_timeout")),
    "hypercorn": frozenset(("-b", "--bind", "-w", "--workers", "-k", "--worker-class", "-c",
        "--config", "--root-path", "--keep-alive", "--graceful-timeout", "--access-logfile",
        "--error-logfile", "--log-level", "--log-config", "--ca-certs", "--certfile", "--keyfile",
        "-u", "--user", "-g", "--group", "-m", "--umask", "-p", "--pid", "--backlog",
        "--insecure-bind", "--quic-bind", "--access-logformat", "--server-name")),
    "fastapi": frozenset(("--host", "--port", "--workers", "--root-path", "--app",
        "--entrypoint", "-e", "--forwarded-allow-ips")),
}


def _server(command: str) -> tuple[str, list[str]]:
    """The server a web command runs ("gunicorn", "uvicorn", or another program's name) and
    its arguments."""
    words = _command_words(command)
    if len(words) >= 3 and words[0].startswith("python") and words[1] == "-m":
        words = words[2:]
    if not words:
        return "", []
    return words[0].rsplit("/", 1)[-1], words[1:]


def _positional(arguments: list[str], valued: frozenset[str]) -> str:
    """The first argument that is neither an option nor an option's value."""
    skip = False
    for word in arguments:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in valued
        else:
            return word
    return ""


def _gunicorn_app(arguments: list[str]) -> str:
    word = _positional(arguments, _VALUED)
    if WSGI_APP.fullmatch(word):
        return word
    if WSGI_MODULE.fullmatch(word):
        return f"{word}:application"
    return ""


def _worker_class(arguments: list[str]) -> str:
    for number, word in enumerate(arguments):
        if word in ("-k", "--worker-class") and number + 1 < len(arguments):
            return arguments[number + 1]
        if word.startswith("--worker-class="):
            return word.partition("=")[2]
    return ""


def web_app(command: str) -> str:
    """The WSGI app (MODULE:CALLABLE) a ``web`` command's gunicorn serves, "" if the command
    is not gunicorn's, names none, or serves ASGI. A bare MODULE is gunicorn's
    MODULE:application."""
    server, arguments = _server(command)
    if server != "gunicorn" or _worker_class(arguments).startswith(_UVICORN_WORKERS):
        return ""
    return _gunicorn_app(arguments)


def web_asgi(command: str) -> str:
    """The ASGI app (MODULE:CALLABLE, or MODULE:FACTORY() for ``--factory``) a ``web``
    command's uvicorn serves (or its gunicorn with uvicorn's worker, FastAPI's ``fastapi run``,
    daphne, hypercorn); "" if none."""
    server, arguments = _server(command)
    if server == "gunicorn":
        return _gunicorn_app(arguments) if _worker_class(arguments).startswith(_UVICORN_WORKERS) else ""
    if server == "fastapi":
        return _fastapi_app(arguments)
    if server in _ASGI_VALUED:
        word = _positional(arguments, _ASGI_VALUED[server])
        return word if WSGI_APP.fullmatch(word) else ""
    if server != "uvicorn":
        return ""
    word = _positional(arguments, _UVICORN_VALUED)
    if not WSGI_APP.fullmatch(word):
        return ""
    return f"{word}()" if "--factory" in arguments and not word.endswith(")") else word


# The options of a server that name the directory its app is imported from.
_DIRECTORY_OPTIONS = {"gunicorn": ("--chdir", "--pythonpath"), "uvicorn": ("--app-dir",)}


def app_directory(command: str) -> str:
    """The directory a web command's server imports its app from, as given ("" if none)."""
    server, arguments = _server(command)
    names = _DIRECTORY_OPTIONS.get(server, ())
    for number, word in enumerate(arguments):
        if word in names and number + 1 < len(arguments):
            return arguments[number + 1]
        name, equals, value = word.partition("=")
        if equals and name in names:
            return value
    return ""


def _directory(release: Path, base: str, directory: str, step: str) -> str:
    """``directory`` (relative to ``base``, a directory of the release) as a path relative to
    the release ("" for the release itself); ProcfileError unless it is a directory in it."""
    if not directory:
        return base
    joined = posixpath.normpath(posixpath.join(base, directory))
    inside = not directory.startswith(("/", "~")) and "$" not in directory and (
        joined != ".." and not joined.startswith("../"))
    target = (release / joined).resolve() if inside else release
    if not inside or not target.is_relative_to(release.resolve()) or not target.is_dir():
        raise ProcfileError(f"{FILENAME}: web: {step!r}: {directory!r} is not a directory of the "
                            "release (bluegreen serves the app from the release it deploys: "
                            "name the directory relative to the repository's top)")
    return "" if joined == "." else joined


def _in(step: str, directory: str, current: str) -> str:
    """``step`` run where a shell in ``current`` (relative to the release) finds ``directory``."""
    if directory == current:
        return step
    return f"cd {shlex.quote(posixpath.relpath(directory or '.', current or '.'))} && {step}"


def _fastapi_app(arguments: list[str]) -> str:
    """``fastapi run FILE.py [--app NAME]``: the module of FILE (a path in the repository) and
    NAME, ``app`` by default. Without a file the CLI searches: not guessed."""
    if arguments[:1] != ["run"]:
        return ""
    path = _positional(arguments[1:], _ASGI_VALUED["fastapi"])
    name = "app"
    for number, word in enumerate(arguments):
        if word == "--app" and number + 1 < len(arguments):
            name = arguments[number + 1]
        elif word.startswith("--app="):
            name = word.partition("=")[2]
    module = path.removeprefix("./").removesuffix(".py").replace("/", ".")
    app = f"{module}:{name}"
    return app if path.endswith(".py") and WSGI_APP.fullmatch(app) else ""


def chain(command: str) -> list[str]:
    """The steps of a shell command chained with ``&&`` or ``;`` (outside quotes)."""
    steps: list[str] = []
    current: list[str] = []
    quote = ""
    index = 0
    while index < len(command):
        char = command[index]
        if quote:
            if char == "\\" and quote == '"':
                current.append(command[index:index + 2])
                index += 2
                continue
            quote = "" if char == quote else quote
        elif char == "\\":
            current.append(command[index:index + 2])
            index += 2
            continue
        elif char in "'\"":
            quote = char
        elif char == ";" or command.startswith("&&", index):
            steps.append("".join(current).strip())
            current = []
            index += 1 if char == ";" else 2
            continue
        current.append(char)
        index += 1
    steps.append("".join(current).strip())
    return [step for step in steps if step]


def step_phase(step: str) -> str:
    """The phase a step of a web line belongs to (RELEASE_PHASE, BUILD), "" if none."""
    words = _command_words(step)
    if words[:1] and words[0].rsplit("/", 1)[-1].startswith("python"):
        words = ["django-admin", *words[3:]] if words[1:3] == ["-m", "django"] else words[1:]
    if words[:1] and words[0].rsplit("/", 1)[-1] in ("manage.py", "django-admin"):
        return _DJANGO_STEPS.get(words[1] if len(words) > 1 else "", "")
    if any(tuple(words[:len(migration)]) == migration for migration in _MIGRATIONS):
        return RELEASE_PHASE
    return ""


def parse(text: str) -> dict[str, str]:
    """Process types of a Procfile: ``name: command`` lines; blank lines and # comments skip."""
    types: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.fullmatch(stripped)
        if not match or not match[2].strip():
            raise ProcfileError(f"{FILENAME}:{number}: expected 'name: command', got {stripped[:60]!r}")
        name = match[1]
        if not PROCESS_NAME.fullmatch(name):
            raise ProcfileError(f"{FILENAME}:{number}: {name!r} is not a process name "
                                "(letters, digits, '-', '_'; at most 32)")
        if name in types:
            raise ProcfileError(f"{FILENAME}:{number}: process type {name!r} appears twice")
        types[name] = match[2].strip()
    return types


def processes(release: Path, migrate_command: str, overrides: Mapping[str, str], *,
              build_command: str = "") -> Processes:
    """The release phase, the workers and the web line's build steps of the release in
    ``release``; ``migrate_command`` and ``build_command`` are the configuration's."""
    try:
        text = (release / FILENAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ProcfileError(f"{FILENAME}: cannot read: {exc}") from None
    types = parse(text)
    release_line = types.pop("release", "")
    web_line = types.pop("web", "")
    types.update(overrides)
    workers = {name: command for name, command in sorted(types.items()) if command}
    steps = chain(web_line)
    if len(steps) < 2:
        asgi = web_asgi(web_line)
        web = asgi or web_app(web_line)
        web_dir = _directory(release, "", app_directory(web_line), web_line) if web else ""
        return Processes(release=migrate_command or release_line, workers=workers,
                         web=web, asgi=bool(asgi), web_dir=web_dir)
    mapped: dict[str, list[str]] = {RELEASE_PHASE: [], BUILD: []}
    # The configuration wins over the Procfile, and its release: line over its web line.
    overridden = {RELEASE_PHASE: "release.migrate_command is the release phase" if migrate_command
                  else "the Procfile's release: line is the release phase" if release_line else "",
                  BUILD: "release.build_command is the build" if build_command else ""}
    described = []
    web, is_asgi, web_dir = "", False, ""
    here = ""  # where the steps run, relative to the release, as the line's cd steps lead
    where = {RELEASE_PHASE: "", BUILD: ""}  # where the shell of each phase is
    for step in steps:
        words = _command_words(step)
        if words[:1] == ["cd"]:
            if len(words) != 2:
                raise ProcfileError(f"{FILENAME}: web: {step!r}: cd to which directory?")
            here = _directory(release, here, words[1], step)
            described.append(f"{step} -> the directory of the steps after it")
            continue
        asgi = web_asgi(step)
        app = asgi or web_app(step)
        phase = step_phase(step)
        if app:
            if not web:
                web, is_asgi = app, bool(asgi)
                web_dir = _directory(release, here, app_directory(step), step)
            described.append(f"{step} -> serves {app}" + (f" in {web_dir}" if web_dir else ""))
        elif phase and overridden[phase]:
            described.append(f"{step} -> ignored ({overridden[phase]})")
        elif phase:
            mapped[phase].append(_in(step, here, where[phase]))
            where[phase] = here
            described.append(f"{step} -> {phase}")
        else:
            described.append(f"{step} -> ignored")
    return Processes(
        release=migrate_command or release_line or " && ".join(mapped[RELEASE_PHASE]),
        workers=workers, web=web, asgi=is_asgi, build=" && ".join(mapped[BUILD]),
        web_steps=tuple(described), web_dir=web_dir)
