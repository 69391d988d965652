"""Verifying a release before any unit serves it, each command in a transient unit of its own
(see release/transient.py) within ``release.timeout``:

1. its Python environment: found by the key of its dependency files, or built (a venv, then
   ``pip install``) as the user ``bluegreen-build``, which may write only there and in the
   app's own pip cache (pruned to its size limit after each build, see release/pipcache.py);
2. its build (``release.build_command``, the Procfile web line's build steps, Django's
   collectstatic: see release/build.py), as ``bluegreen-build``, in the release's directory,
   which belongs to that user for the time of the build and to root again afterwards, with
   the app's settings and only the secrets ``release.build_secrets`` names (a placeholder for
   each other: settings that read one at import load);
3. an import of the WSGI application, as the app itself (its user, settings, secrets, data
   directory and network), since that is how an instance will import it moments later; for
   an ASGI app, first uvicorn's gunicorn worker from the release's own environment;
4. ``release.check_command``, as ``bluegreen-build``, with the release read-only, and the
   build's settings and secrets.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bluegreen.config import Config, Network
from bluegreen.files import give_tree
from bluegreen.log import fields
from bluegreen.release import appenv, build, pipcache, transient
from bluegreen.release.transient import Command, CommandFailed
from bluegreen.release.venvs import SYSTEM_PYTHON, DependencyError, Venvs, dependencies
from bluegreen.systemd import Systemd

log = logging.getLogger(__name__)

BUILD_USER = "bluegreen-build"

# Imports MODULE and resolves CALLABLE (gunicorn's "module:attr" or "module:factory()").
IMPORT_CHECK = """\
import importlib, sys
sys.path.insert(0, ".")
module, _, name = sys.argv[1].partition(":")
target = importlib.import_module(module)
for part in name.split("."):
    call = part.endswith("()")
    target = getattr(target, part[:-2] if call else part)
    if call:
        target = target()
if not callable(target):
    sys.exit(f"{sys.argv[1]} is not callable")
"""

# An ASGI app runs on uvicorn's gunicorn worker, which the release brings: Debian's python3-*
# packages (seen through the venv) do not count, so that what serves is what the app pinned.
ASGI_CHECK = """\
import importlib.util, os, sys, warnings
venv = os.environ.get("VIRTUAL_ENV", "")
found = importlib.util.find_spec("uvicorn")
if not venv or found is None or not (found.origin or "").startswith(venv + "/"):
    sys.exit(f"{sys.argv[1]} is an ASGI app, and the release's requirements do not pin uvicorn: "
             "add uvicorn (and websockets, for websocket routes) to requirements.txt")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import bluegreen.asgiworker
""" + IMPORT_CHECK

# $1: the environment's directory; the rest: what pip installs. pip's cache is pruned whether
# pip succeeded or not (-I: the release's directory, the working one, is not on sys.path).
_BUILD_ENVIRONMENT = ('env="$1"; shift; '
                      f'{SYSTEM_PYTHON} -m venv --system-site-packages "$env" && '
                      '"$env/bin/python3" -m pip install --disable-pip-version-check --no-input '
                      '--progress-bar off --ignore-installed "$@"; status=$?; '
                      f'{SYSTEM_PYTHON} -I -m bluegreen.release.pipcache "$PIP_CACHE_DIR"; exit $status')
# --ignore-installed: the whole closure of what the release asks for goes into its environment,
# whatever Debian's python3-* packages (seen through --system-site-packages) hold.


class VerifyFailed(Exception):
    """The release failed a check; the message says which and why."""


def build_identity(user: str = BUILD_USER) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise VerifyFailed(f"the user {user} does not exist (it comes with the package; "
                           "systemd-sysusers creates it)") from None
    return entry.pw_uid, entry.pw_gid


@dataclass(frozen=True)
class Verifier:
    systemd: Systemd
    config: Config
    environments: Venvs
    deployment_id: int

    async def _run(self, command: Command) -> None:
        try:
            await transient.run(self.systemd, command, self.deployment_id)
        except CommandFailed as exc:
            raise VerifyFailed(exc.reason) from None

    async def _run_build(self, command: Command) -> None:
        """Run a command of the build; one that failed naming a secret it was not given (the
        settings of a Django project that require one at import) says how to give it."""
        try:
            await self._run(command)
        except VerifyFailed as exc:
            withheld = [name for name in appenv.secret_names(self.config.app_name)
                        if name not in self.config.release.build_secrets and name in str(exc)]
            if not withheld:
                raise
            raise VerifyFailed(f"{exc} (a build gets a placeholder for the app's secret "
                               f"{', '.join(withheld)}, the secret itself only if "
                               "release.build_secrets names it)") from None

    async def environment(self, release_dir: Path) -> Path | None:
        """The release's Python environment, built unless one with its dependencies exists;
        None when the release declares no dependencies (it runs on Debian's packages)."""
        try:
            # Off the event loop: hashing a large local project (-e .) takes a while.
            wanted = await asyncio.to_thread(dependencies, release_dir)
        except DependencyError as exc:
            raise VerifyFailed(f"dependencies: {exc}") from None
        if wanted is None:
            return None
        found = self.environments.find(release_dir, wanted)
        if found is not None:
            log.info("environment %s has the dependencies already", found,
                     extra=fields(deployment_id=self.deployment_id))
            self.environments.record(release_dir, found)
            return self.environments.path(found)
        key = wanted.digest
        directory = self.environments.path(key)
        started = time.monotonic()
        self.environments.prepare(key, build_identity())
        what = wanted.requirements or "[project] dependencies"
        try:
            await self._run(Command(
                what=f"installing the dependencies of {what}", kind="build",
                argv=["/bin/sh", "-c", _BUILD_ENVIRONMENT, "sh", str(directory),
                      *wanted.pip_arguments()],
                directory=release_dir, user=BUILD_USER, timeout=self.config.release.timeout,
                environment={"HOME": str(directory),
                             "PIP_CACHE_DIR": str(pipcache.path(self.config.app_name))},
                writable=[directory], cache_directories=[pipcache.cache_directory(self.config.app_name)],
                network=Network.ANY, app=self.config.app_name))
        except BaseException:
            self.environments.discard(key)
            raise
        self.environments.complete(key, wanted)
        self.environments.record(release_dir, key)
        log.info("built environment %s in %.1f s", key, time.monotonic() - started,
                 extra=fields(deployment_id=self.deployment_id))
        return directory

    async def verify(self, directory: Path, env: Mapping[str, str], wsgi: str,
                     web_build: str = "", *, asgi: bool = False, web_dir: str = "") -> None:
        """Build and check the release in ``directory``, which serves ``wsgi`` (an ASGI app if
        ``asgi``) imported from its subdirectory ``web_dir``; ``env`` is the app's environment,
        ``web_build`` the build steps of the Procfile's web line."""
        release = self.config.release
        build_env = {**appenv.build_placeholders(self.config.app_name, release.build_secrets, env),
                     **env, "HOME": str(directory), "BLUEGREEN_WSGI": wsgi}
        credentials = appenv.build_credentials(self.config.app_name, release.build_secrets)
        with_secrets = [appenv.WITH_SECRETS] if credentials else []
        steps = build.steps(release, directory, web_build, env["BLUEGREEN_PYTHON"], web_dir)
        if steps:
            give_tree(directory, *build_identity())
            try:
                for step in steps:
                    await self._run_build(Command(
                        what=step.what, kind="build", argv=[*with_secrets, *step.argv],
                        directory=directory / step.directory, user=BUILD_USER, timeout=release.timeout,
                        environment=build_env, writable=[directory], credentials=credentials,
                        network=Network.ANY, app=self.config.app_name))
            finally:
                give_tree(directory, 0, 0)
        await self._run(appenv.command(
            self.config, f"importing {wsgi}", "check",
            [env["BLUEGREEN_PYTHON"], "-c", ASGI_CHECK if asgi else IMPORT_CHECK, wsgi],
            directory / web_dir, env))
        if release.check_command:
            await self._run_build(Command(
                what="release.check_command", kind="check",
                argv=[*with_secrets, "/bin/sh", "-c", release.check_command],
                directory=directory, user=BUILD_USER, timeout=release.timeout,
                environment=build_env, credentials=credentials, network=Network.ANY,
                app=self.config.app_name))
