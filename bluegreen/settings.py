"""Settings in effect versus settings in the file.

``systemctl reload bluegreen`` reads bluegreen.toml again. Most keys apply at once; the keys
that say how the serving release runs (``app.*``, ``ports.public``, ``forwarder``,
``processes``) keep the values it was deployed with until the next deploy, and ``api.listen``
belongs to bluegreen-api.socket, which systemd binds. What is still pending is what
``bluegreenctl status`` lists.

The values the serving release was deployed with are kept with the records, so a restarted
controller knows them too.
"""

from __future__ import annotations

import ipaddress
import logging

from bluegreen import sockdiag
from bluegreen.config import Applies, Config, ConfigError, ListenAddress, changed, with_deployed
from bluegreen.history import History, HistoryError
from bluegreen.systemd import Systemd, SystemdError

log = logging.getLogger(__name__)

DEPLOYED = "serving.settings"
API_SOCKET = "bluegreen-api.socket"


class Settings:
    """One app's settings, three ways: ``in_file``, as its file says now; ``deployed_with``,
    as the serving release was deployed; ``in_effect``, the file's but for the keys that
    apply at the next deploy, which keep the values the serving release was deployed with."""

    def __init__(self, in_file: Config, history: History) -> None:
        self.history = history
        self.in_file = in_file
        self.deployed_with = load_deployed(history) or in_file
        self.in_effect = with_deployed(in_file, self.deployed_with)

    def reload(self, in_file: Config, serving: bool) -> list[tuple[str, str]]:
        """The file as read again (``serving``: a release serves, deployed with what it was);
        return each changed key with when it takes effect."""
        changes = [(key.dotted, str(key.applies)) for key in changed(self.in_file, in_file)]
        self.in_file = in_file
        self.in_effect = with_deployed(in_file, self.deployed_with if serving else in_file)
        for key, when in changes:
            log.info("reload: %s changed; it applies %s", key, when)
        if not changes:
            log.info("reload: no change in %s", in_file.source)
        return changes

    def deployed(self, config: Config) -> None:
        """A deployment succeeded with ``config``: its deploy-time settings are in effect."""
        self.deployed_with = config
        save_deployed(self.history, config)
        self.in_effect = with_deployed(self.in_file, config)

    async def pending(self, systemd: Systemd, serving: bool) -> list[tuple[str, str]]:
        """Settings of the file not in effect yet, each with what applies it."""
        pending = pending_until_deploy(self.in_effect, self.in_file) if serving else []
        if await api_socket_pending(systemd, self.in_file.api.listen):
            pending.append(("api.listen", str(Applies.API_SOCKET)))
        return pending


def load_deployed(history: History) -> Config | None:
    """The settings the serving release was deployed with (None: not known)."""
    try:
        text = history.get_value(DEPLOYED)
        return Config.from_json(text) if text else None
    except (HistoryError, ConfigError, ValueError) as exc:
        log.warning("the settings of the serving release are not known (%s): "
                    "taking the file's as theirs", exc)
        return None


def save_deployed(history: History, config: Config) -> None:
    try:
        history.set_value(DEPLOYED, config.to_json())
    except HistoryError as exc:
        log.error("%s; after a restart, bluegreenctl status may not list settings pending "
                  "until the next deploy", exc)


def pending_until_deploy(effective: Config, loaded: Config) -> list[tuple[str, str]]:
    """Keys whose value in the file differs from the one the serving release runs with."""
    return [(key.dotted, str(key.applies)) for key in changed(effective, loaded)
            if key.applies == Applies.NEXT_DEPLOY]


async def api_socket_pending(systemd: Systemd, listen: ListenAddress) -> bool:
    """Whether bluegreen-api.socket does not listen on ``listen`` yet: its configuration says
    another address (no daemon-reload since the change), or it says this one but the socket
    was not restarted (systemd closes the old one at daemon-reload and binds the new one only
    at the next start)."""
    try:
        state, addresses = await systemd.socket_listens(API_SOCKET)
    except SystemdError as exc:
        log.warning("cannot read %s: %s", API_SOCKET, exc)
        return False
    if str(listen) not in addresses:
        return True
    if state != "active":
        return False  # stopped on purpose: it binds what it says when started
    return not any(_same_host(sock.local_address, listen.host)
                   for sock in sockdiag.listeners(listen.port))


def _same_host(bound: str, host: str) -> bool:
    try:
        return ipaddress.ip_address(bound) == ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name: the port is all that can be compared
