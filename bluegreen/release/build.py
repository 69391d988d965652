"""What a release's build runs: ``release.build_command``, else the build steps of the
Procfile's web line (its collectstatic), then Django's collectstatic where none of those runs it.

A Django project gets ``manage.py collectstatic --no-input`` at build as Heroku gives it: when
the release has a ``manage.py`` whose settings install ``django.contrib.staticfiles`` and set
``STATIC_ROOT`` (``release.collectstatic = false`` turns it off). The files land in the release
(STATIC_ROOT is a directory of the project), so every instance of it serves the same ones,
and a manifest storage (whitenoise's) finds its manifest.

A build sees the app's settings (``[app.environment]``, so that it can import the project's
settings) and only the secrets ``release.build_secrets`` names, a placeholder for each other
(appenv.build_placeholder): it runs code of the repository, with the network, as
``bluegreen-build``, which writes the release.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bluegreen.config import ReleaseConfig

# Run by the release's Python in the release's directory: the settings module from the
# environment, else the one manage.py sets by default; collectstatic only when the settings
# install staticfiles with a STATIC_ROOT.
COLLECTSTATIC = """\
import os, re, sys
sys.path.insert(0, ".")
name = os.environ.get("DJANGO_SETTINGS_MODULE")
if not name:
    found = re.search(r"DJANGO_SETTINGS_MODULE['\\"]\\s*,\\s*['\\"]([\\w.]+)['\\"]",
                      open("manage.py", encoding="utf-8").read())
    if not found:
        sys.exit(print("collectstatic skipped: manage.py names no DJANGO_SETTINGS_MODULE"))
    name = os.environ["DJANGO_SETTINGS_MODULE"] = found[1]
try:
    import django
except ImportError:
    sys.exit(print("collectstatic skipped: Django is not installed"))
try:
    django.setup()
except Exception:
    import traceback
    traceback.print_exc()
    sys.exit(f"collectstatic: the settings {name} do not load at build, which has the app's "
             "[app.environment] but, of the secrets, only those release.build_secrets names (and "
             "a placeholder for each other)")
from django.apps import apps
from django.conf import settings
if not apps.is_installed("django.contrib.staticfiles"):
    sys.exit(print("collectstatic skipped: django.contrib.staticfiles is not installed"))
if not settings.STATIC_ROOT:
    sys.exit(print("collectstatic skipped: the settings set no STATIC_ROOT"))
from django.core.management import call_command
call_command("collectstatic", interactive=False, verbosity=1)
"""


@dataclass(frozen=True)
class Step:
    what: str  # for people, and the failure's reason
    argv: list[str]
    directory: str = ""  # where it runs, relative to the release


def steps(release: ReleaseConfig, directory: Path, web_build: str, python: str,
          web_dir: str = "") -> list[Step]:
    """The build of the release in ``directory``: ``web_build`` is what the Procfile's web line
    maps to the build (empty when release.build_command is set), ``python`` the release's,
    ``web_dir`` the directory the app is imported from, where its manage.py is."""
    found = []
    if release.build_command:
        found.append(Step("release.build_command", ["/bin/sh", "-c", release.build_command]))
    if web_build:
        found.append(Step("the Procfile web line's build steps", ["/bin/sh", "-c", web_build]))
    collected = any("collectstatic" in step.argv[-1] for step in found)
    project = web_dir if (directory / web_dir / "manage.py").is_file() else ""
    if release.collectstatic and not collected and (directory / project / "manage.py").is_file():
        found.append(Step("collectstatic", [python, "-c", COLLECTSTATIC], project))
    return found
