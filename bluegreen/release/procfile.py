"""The app's process types: its ``Procfile`` (as Heroku, Dokku and piku read it), merged with
the ``[processes]`` table of the configuration.

``web`` is what bluegreen serves itself (gunicorn on the instance's port): a ``gunicorn``
command there names the WSGI app, used unless ``app.wsgi`` names one; its options are not
(bluegreen sets the port, workers and worker class). ``release`` is the release phase
(``release.migrate_command`` wins over it); every other type is a worker.

A web line may chain steps before gunicorn (``python manage.py migrate && python manage.py
collectstatic --no-input && gunicorn mysite.wsgi``, as on Railway or Render). bluegreen never
runs the line itself, since every instance's start would then migrate: each step is mapped to
what does the same once per release (collectstatic to the build, a migration to the release
phase) or ignored, and ``Processes.web_steps`` says which, for the journal and the record.
"""

from __future__ import annotations

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
    web: str = ""  # the WSGI app the web line's gunicorn names ("" if none)
    build: str = ""  # the web line's build steps, when release.build_command is empty
    # Each step of a chained web line and what bluegreen made of it ("STEP -> build").
    web_steps: tuple[str, ...] = ()


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


def web_app(command: str) -> str:
    """The WSGI app (MODULE:CALLABLE) a ``web`` command's gunicorn serves, "" if the command
    is not gunicorn's or names none. A bare MODULE is gunicorn's MODULE:application."""
    words = _command_words(command)
    if len(words) >= 3 and words[0].startswith("python") and words[1:3] == ["-m", "gunicorn"]:
        words = words[2:]
    if not words or words[0].rsplit("/", 1)[-1] != "gunicorn":
        return ""
    skip = False
    for word in words[1:]:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in _VALUED
        elif WSGI_APP.fullmatch(word):
            return word
        elif WSGI_MODULE.fullmatch(word):
            return f"{word}:application"
    return ""


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
    web = web_app(web_line)
    types.update(overrides)
    workers = {name: command for name, command in sorted(types.items()) if command}
    steps = chain(web_line)
    if len(steps) < 2:
        return Processes(release=migrate_command or release_line, workers=workers, web=web)
    mapped: dict[str, list[str]] = {RELEASE_PHASE: [], BUILD: []}
    # The configuration wins over the Procfile, and its release: line over its web line.
    overridden = {RELEASE_PHASE: "release.migrate_command is the release phase" if migrate_command
                  else "the Procfile's release: line is the release phase" if release_line else "",
                  BUILD: "release.build_command is the build" if build_command else ""}
    described = []
    for step in steps:
        app = web_app(step)
        phase = step_phase(step)
        if app:
            web = web or app
            described.append(f"{step} -> serves {app}")
        elif phase and overridden[phase]:
            described.append(f"{step} -> ignored ({overridden[phase]})")
        elif phase:
            mapped[phase].append(step)
            described.append(f"{step} -> {phase}")
        else:
            described.append(f"{step} -> ignored")
    return Processes(
        release=migrate_command or release_line or " && ".join(mapped[RELEASE_PHASE]),
        workers=workers, web=web, build=" && ".join(mapped[BUILD]), web_steps=tuple(described))
