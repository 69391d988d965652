"""Making a commit ready to serve: the materialize and verify steps of a deploy.

A release not on disk yet is materialized into a staging directory, built and checked there,
then published; one on disk (a rollback, a recovery) is only read again. Either way the
result says what every process of the release gets: its directory, process types, WSGI app
and environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bluegreen.config import DEFAULT_WSGI, Config
from bluegreen.history import Step
from bluegreen.log import fields
from bluegreen.recorder import Recorder
from bluegreen.release import appenv, procfile
from bluegreen.release.procfile import Processes
from bluegreen.release.releases import Releases
from bluegreen.release.repository import Repository
from bluegreen.release.venvs import Venvs
from bluegreen.release.verify import Verifier
from bluegreen.systemd import Systemd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A verified release on disk, and what its processes run with."""

    commit: str
    directory: Path
    processes: Processes
    wsgi: str  # the app gunicorn serves, MODULE:CALLABLE
    environment: dict[str, str]
    asgi: bool = False  # wsgi is an ASGI app, served by uvicorn's worker


# Given the settings and the deployment id: what builds and checks a release.
VerifierFactory = Callable[[Config, int], Verifier]


@dataclass
class Preparer:
    systemd: Systemd
    repository: Repository
    releases: Releases
    environments: Venvs
    make_verifier: VerifierFactory | None = None

    def verifier(self, config: Config, deployment_id: int) -> Verifier:
        if self.make_verifier is not None:
            return self.make_verifier(config, deployment_id)
        return Verifier(self.systemd, config, self.environments, deployment_id)

    async def prepare(self, config: Config, recorder: Recorder) -> Prepared:
        """Materialize and verify the recorded deployment's commit (unless on disk already)."""
        commit, deployment_id = recorder.record.commit, recorder.record.id
        directory = self.releases.path(commit)
        staging: Path | None = None
        try:
            async with recorder.step(Step.MATERIALIZE):
                if not self.releases.exists(commit):
                    staging = await self.releases.stage(self.repository, commit)
            async with recorder.step(Step.VERIFY):
                source = staging or directory
                processes = procfile.processes(source, config.release.migrate_command,
                                               config.processes,
                                               build_command=config.release.build_command)
                _tell_web_steps(processes, recorder)
                wsgi, asgi = _app(config, processes, deployment_id)
                verifier = self.verifier(config, deployment_id)
                environment_dir = await verifier.environment(source)
                env = appenv.environment(config, commit, directory, environment_dir, deployment_id)
                if staging is not None:
                    # Built and checked where it lies until it is published.
                    await verifier.verify(staging, {**env, "BLUEGREEN_RELEASE_DIR": str(staging)},
                                          wsgi, processes.build, asgi=asgi,
                                          web_dir=processes.web_dir)
                    directory = self.releases.publish(staging, commit)
                    staging = None
        finally:
            if staging is not None:  # an unfinished release is never published
                self.releases.discard(staging)
        return Prepared(commit, directory, processes, wsgi, env, asgi)


def _tell_web_steps(processes: Processes, recorder: Recorder) -> None:
    """Say what became of each step of a chained web line, in the journal and the record."""
    if not processes.web_steps:
        return
    recorder.update(web_steps=processes.web_steps)
    log.info("the Procfile's web line chains steps; bluegreen runs none at an instance's start: %s",
             "; ".join(processes.web_steps), extra=fields(deployment_id=recorder.record.id))


def _app(config: Config, processes: Processes, deployment_id: int) -> tuple[str, bool]:
    """The app to serve, and whether it is an ASGI app: app.wsgi or app.asgi, else the one the
    Procfile's web line names, else the WSGI app app:app."""
    if config.app.wsgi:
        return config.app.wsgi, False
    if config.app.asgi:
        return config.app.asgi, True
    if processes.web:
        log.info("serving %s, the %s app the Procfile's web line names", processes.web,
                 "ASGI" if processes.asgi else "WSGI", extra=fields(deployment_id=deployment_id))
        return processes.web, processes.asgi
    return DEFAULT_WSGI, False
