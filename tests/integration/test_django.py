"""A Django 5 project (examples/django-site) as a new user brings it: a Procfile whose web line
chains migrate, collectstatic and gunicorn, and no app.wsgi, build_command or migrate_command;
whitenoise's manifest storage, SQLite in the data directory, a secret the settings require at
import. Releases 2 (a migration) and 3 (code only) deploy under load.

The container has no network: pip installs from the wheelhouse (tests/wheelhouse.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from typing import Any

import pytest

from tests import wheelhouse
from tests.integration.helpers import (
    App,
    Load,
    call,
    configure,
    git,
    http,
    properties,
    public,
    wait_deployment,
    wait_serving,
)
from tests.sandbox import ROOT, Sandbox

pytestmark = pytest.mark.integration

SITE = ROOT / "examples/django-site"
SECRET = "django-" + "Sup3rS3cretK3y" * 4
DATABASE = "/var/lib/bluegreen/data/site.sqlite3"
# No app.wsgi, build_command, migrate_command or build_secrets: the Procfile's web line says
# it all. The settings read DJANGO_SECRET_KEY at import, and collectstatic imports them at
# build, where the key is a placeholder.
CONFIG = """post_switch_watch = 1
[app]
health_host = "site.internal"
[app.environment]
DJANGO_ALLOWED_HOSTS = "site.internal,127.0.0.1"
DATABASE_URL = "sqlite:///{data_dir}/site.sqlite3"
[health]
interval = 0.2
[release]
timeout = 300
"""
WEB_STEPS = [
    "python manage.py migrate --no-input -> release phase",
    "python manage.py collectstatic --no-input -> build",
    "gunicorn mysite.wsgi --log-file - -> serves mysite.wsgi:application",
]


class Site(App):
    def __init__(self, box: Sandbox) -> None:
        super().__init__(box)
        self.releases: dict[str, str] = {}
        self.entry_id = 0

    def create(self) -> str:
        shutil.copytree(SITE, self.work, ignore=shutil.ignore_patterns(
            "variants", "__pycache__", "staticfiles", "db.sqlite3"))
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "add", ".")
        git(self.work, "commit", "-q", "-m", "mysite")
        subprocess.run(["git", "clone", "-q", "--bare", str(self.work), str(self.bare)], check=True)
        return git(self.work, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def site(box: Sandbox) -> Site:
    """bluegreen configured for the Django project, its secret in place, release 1 serving."""
    box.use_wheelhouse(wheelhouse.build())
    repository = Site(box)
    repository.releases["1"] = repository.create()
    configure(box, CONFIG)
    box.write("/etc/bluegreen/secrets/DJANGO_SECRET_KEY", SECRET + "\n", mode=0o600)
    box.path("/etc/bluegreen/secrets").chmod(0o700)
    box.run("systemctl", "start", "bluegreen.service", "bluegreen-api.socket")
    wait_serving(box, timeout=300)
    return repository


def deploy(box: Sandbox) -> dict[str, Any]:
    return wait_deployment(box, call(box, "Deploy", "s", ""), timeout=300)


def steps(record: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {name: (float(started), float(finished)) for name, started, finished in record["steps"]}


def test_the_chained_web_line_is_mapped_and_static_files_are_collected_at_build(
        box: Sandbox, site: Site) -> None:
    record = call(box, "ListDeployments", "u", "1")[0]
    assert record["state"] == "succeeded" and record["commit"] == site.releases["1"], record
    assert record["web_steps"] == WEB_STEPS
    status = box.run("bluegreenctl", "status").stdout
    for step in WEB_STEPS:
        assert f"Web line:    {step}" in status, status
    told = box.journal(f"DEPLOYMENT_ID={record['id']}", "-o", "cat")
    assert "bluegreen runs none at an instance's start" in told, told[-3000:]
    assert "1 static file copied" in told, told[-3000:]  # collectstatic, at build

    index = public(box)
    assert (index["version"], index["release"]) == ("1", site.releases["1"]), index
    assert index["django"].startswith("5.2.")
    assert index["schema"] == "0001_initial"  # migrated in the release phase
    assert index["secret_fingerprint"] == hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    # whitenoise's manifest: the hashed name of a file collectstatic put in the release.
    assert re.fullmatch(r"/static/guestbook/site\.[0-9a-f]{12}\.css", index["stylesheet"]), index
    stylesheet = http(box, "GET", index["stylesheet"], port=5000)
    assert stylesheet.status == 200 and "font-family" in stylesheet.body, stylesheet
    release_dir = f"/var/lib/bluegreen/releases/{site.releases['1']}"
    assert box.exists(f"{release_dir}/staticfiles/staticfiles.json")
    assert box.run("stat", "-c", "%U", f"{release_dir}/staticfiles").stdout.strip() == "root"
    # Served as mysite.wsgi:application, and no instance ran the web line's migrate.
    port = properties(box)["ActivePort"]
    assert 'BLUEGREEN_WSGI="mysite.wsgi:application"' in box.run(
        "cat", f"/run/bluegreen/instances/{port}.env").stdout
    assert "migrate" not in box.run("systemctl", "show", "-p", "ExecStart",
                                    f"bluegreen-app@{port}.service").stdout
    assert box.exists(DATABASE)

    created = http(box, "POST", "/entries", json.dumps({"text": "written by release 1"}), port=5000)
    assert created.status == 201, created
    site.entry_id = created.body["id"]


def test_three_releases_under_load_migrate_before_serving_and_keep_the_data(
        box: Sandbox, site: Site) -> None:
    with Load(box, "--fast", "4", "--slow", "0") as load:
        git(site.work, "apply", str(SITE / "variants/release-2.patch"))
        site.releases["2"] = site.commit("Entries are signed", {})
        second = deploy(box)
        assert second["state"] == "succeeded" and second["commit"] == site.releases["2"], second
        index = public(box)
        assert index["version"] == "2" and index["schema"] == "0002_entry_signed_by", index

        views = (site.work / "guestbook/views.py").read_text()
        site.releases["3"] = site.commit("Release 3", {
            "guestbook/views.py": views.replace('VERSION = "2"', 'VERSION = "3"')})
        third = deploy(box)
        assert third["state"] == "succeeded" and third["commit"] == site.releases["3"], third

    report = load.report
    print(f"\n{report['requests']} requests, {report['failed']} failed, versions {report['versions']}")
    assert report["failed"] == 0, (report["failures_by_kind"], report["failures"][:10])
    assert {"1", "2", "3"} <= set(report["versions"]), report["versions"]

    # The migration ran in the release phase, before release 2's instance started.
    timings = steps(second)
    assert timings["migrate"][1] <= timings["start"][0], timings
    assert "Applying guestbook.0002_entry_signed_by... OK" in box.journal(
        f"DEPLOYMENT_ID={second['id']}", "-o", "cat")
    assert "No migrations to apply." in box.journal(f"DEPLOYMENT_ID={third['id']}", "-o", "cat")

    entry = public(box, f"/entries/{site.entry_id}")
    assert entry == {"id": site.entry_id, "text": "written by release 1",
                     "release": site.releases["1"], "signed_by": "anonymous"}, entry
    index = public(box)
    assert index["version"] == "3" and http(box, "GET", index["stylesheet"], port=5000).status == 200


def test_the_secret_reaches_no_build_that_does_not_ask_for_it(box: Sandbox, site: Site) -> None:
    """The check command, run as the build is, must find what the build saw, or the deploy
    fails: the placeholder without build_secrets, the secret with it."""
    placeholder = "bluegreen-build-placeholder-not-the-secret-DJANGO_SECRET_KEY"
    for given, expected in (("", placeholder), ('build_secrets = ["DJANGO_SECRET_KEY"]\n', SECRET)):
        check = f"check_command = 'test \"$DJANGO_SECRET_KEY\" = {expected}'\n"
        configure(box, CONFIG + given + check)
        box.run("systemctl", "reload", "bluegreen.service")
        sha = site.commit(f"Release with {given or 'no build secret'}",
                          {"guestbook/static/guestbook/site.css": f"/* {given} */ body {{ margin: 0; }}\n"})
        record = deploy(box)
        assert (record["state"], record["commit"]) == ("succeeded", sha), record
        # The instance has the secret itself, whatever the build saw.
        assert public(box)["secret_fingerprint"] == hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    # And a build told the placeholder is the secret fails at verify: the old release serves.
    configure(box, CONFIG + f"check_command = 'test \"$DJANGO_SECRET_KEY\" = {SECRET}'\n")
    box.run("systemctl", "reload", "bluegreen.service")
    serving = public(box)["release"]
    sha = site.commit("Release 6", {"guestbook/static/guestbook/site.css": "body { margin: 1px; }\n"})
    record = deploy(box)
    assert (record["state"], record["failed_step"], record["commit"]) == ("failed", "verify", sha), record
    assert public(box)["release"] == serving


def test_a_project_in_a_subdirectory_without_a_health_route_deploys(box: Sandbox, site: Site) -> None:
    # As a monorepo holds it: the project in backend/, requirements.txt at the top, the web line
    # going there first; and no /health, as most projects (checked on / instead).
    configure(box, CONFIG)  # the test before set a check command and build_secrets
    box.run("systemctl", "reload", "bluegreen.service")
    (site.work / "backend").mkdir()
    git(site.work, "mv", "manage.py", "mysite", "guestbook", "backend/")
    urls = (site.work / "backend/mysite/urls.py").read_text()
    assert '    path("health", views.health),\n' in urls
    sha = site.commit("The project moves to backend/", {
        "Procfile": "web: cd backend && python manage.py migrate --no-input && "
                    "gunicorn mysite.wsgi --log-file -\n",
        "backend/mysite/urls.py": urls.replace('    path("health", views.health),\n', "")})
    record = deploy(box)
    assert (record["state"], record["commit"]) == ("succeeded", sha), record
    assert record["web_steps"] == [
        "cd backend -> the directory of the steps after it",
        "python manage.py migrate --no-input -> release phase",
        "gunicorn mysite.wsgi --log-file - -> serves mysite.wsgi:application in backend"]
    assert "its health is checked on /" in record["reason"], record
    told = box.journal(f"DEPLOYMENT_ID={record['id']}", "-o", "cat")
    assert "No migrations to apply." in told, told[-3000:]  # the release phase, in backend/
    assert "1 static file copied" in told, told[-3000:]  # collectstatic found backend/manage.py
    port = properties(box)["ActivePort"]
    assert 'BLUEGREEN_WEB_DIR="/backend"' in box.run(
        "cat", f"/run/bluegreen/instances/{port}.env").stdout
    index = public(box)
    assert index["release"] == sha and index["schema"] == "0002_entry_signed_by", index
    assert http(box, "GET", index["stylesheet"], port=5000).status == 200
    assert box.exists(f"/var/lib/bluegreen/releases/{sha}/backend/staticfiles/staticfiles.json")
    assert public(box, f"/entries/{site.entry_id}")["text"] == "written by release 1"
