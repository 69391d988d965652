"""The ports of bluegreen's units, and choosing the port of a new instance."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

from bluegreen import instances, sockdiag
from bluegreen.config import PortRange
from bluegreen.forwarders import control
from bluegreen.systemd import Systemd


class NoFreePort(Exception):
    pass


async def of_units(systemd: Systemd, patterns: Sequence[str], *,
                   running_only: bool = False) -> list[int]:
    """The ports named by the instance (and instance socket) and forwarder units that match
    ``patterns``, sorted:
    of every loaded unit whatever its state, or of the running ones only."""
    found = set()
    for status in await systemd.list_units(*patterns):
        port = (instances.port_of(status.name) or instances.socket_port_of(status.name)
                or control.port_of(status.name))
        if port is not None and (status.is_running or not running_only):
            found.add(port)
    return sorted(found)


def pick(
    ports: PortRange,
    taken: Collection[int],
    bindable: Callable[[int], bool] = sockdiag.bindable,
    rng: random.Random | None = None,
) -> int:
    """A random port of the range that no bluegreen unit uses and nobody has bound."""
    rng = rng or random.SystemRandom()
    candidates = [port for port in range(ports.first, ports.last + 1) if port not in taken]
    rng.shuffle(candidates)
    for port in candidates:
        if bindable(port):
            return port
    raise NoFreePort(f"no free port in {ports} ({len(taken)} used by bluegreen units, "
                     "the rest bound by other programs)")
