"""What an app's controller works with, built from the app's paths and settings.

The daemon (through the app manager) builds them with ``build``; a test passes its own, a
repository that never reaches a remote, say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bluegreen import config as configuration
from bluegreen.config import Config
from bluegreen.credentials import Secrets
from bluegreen.deploy import Deployer, PortUser, no_port_user
from bluegreen.forwarders.control import Forwarders
from bluegreen.history import History
from bluegreen.release.catalog import Catalog
from bluegreen.release.prepare import Preparer, VerifierFactory
from bluegreen.release.releases import Releases
from bluegreen.release.repository import Repository
from bluegreen.release.venvs import Venvs
from bluegreen.systemd import Systemd


@dataclass(frozen=True)
class Paths:
    state: Path = Path("/var/lib/bluegreen")  # the app's own (apps.state_dir)
    runtime: Path = Path("/run/bluegreen")  # every app's: units are named by port
    config: Path = configuration.DEFAULT_PATH

    @property
    def database(self) -> Path:
        return self.state / "bluegreen.db"

    @property
    def mirror(self) -> Path:
        return self.state / "repository.git"

    @property
    def releases(self) -> Path:
        return self.state / "releases"

    @property
    def known_hosts(self) -> Path:
        return self.state / "ssh_known_hosts"

    @property
    def environments(self) -> Path:
        return self.state / "environments"


@dataclass(frozen=True)
class Parts:
    secrets: Secrets
    history: History
    repository: Repository
    catalog: Catalog
    forwarders: Forwarders
    deployer: Deployer

    @property
    def releases(self) -> Releases:
        return self.catalog.releases


def build(config: Config, systemd: Systemd, paths: Paths, secrets: Secrets | None = None,
          port_user: PortUser = no_port_user, repository: Repository | None = None,
          verifier: VerifierFactory | None = None) -> Parts:
    """The parts of the app ``config`` describes; ``repository`` and ``verifier`` stand in
    for the git mirror and the verify step's builds."""
    secrets = secrets or Secrets()
    history = History(paths.database)
    repository = repository or Repository(config.repository.url, config.repository.branch,
                                          paths.mirror, secrets, paths.known_hosts)
    releases, environments = Releases(paths.releases), Venvs(paths.environments)
    preparer = Preparer(systemd, repository, releases, environments, verifier)
    forwarders = Forwarders(systemd, paths.runtime, config.app_name)
    deployer = Deployer(systemd, preparer, forwarders, paths.runtime, secrets.redact, port_user)
    return Parts(secrets, history, repository, Catalog(history, releases, environments),
                 forwarders, deployer)
