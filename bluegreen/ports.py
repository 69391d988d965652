"""Choosing the port of a new instance."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

from bluegreen import netstat
from bluegreen.config import PortRange


class NoFreePort(Exception):
    pass


def pick(
    ports: PortRange,
    taken: Collection[int],
    bindable: Callable[[int], bool] = netstat.bindable,
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
