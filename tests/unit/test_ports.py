"""The ports bluegreen's units use: every loaded unit's for a new instance, the running ones'
for reconciliation."""

from __future__ import annotations

import asyncio
import fnmatch

from bluegreen import instances, ports
from bluegreen.forwarders import control
from bluegreen.systemd import UnitStatus

UNITS = {
    "bluegreen-app@8001.service": "active",
    "bluegreen-app@8002.service": "failed",
    "bluegreen-app@8003.service": "activating",
    "bluegreen-forward@8001.service": "active",
    "bluegreen-proxy@8004.service": "inactive",
    "bluegreen-worker@8001-web.service": "active",
}


class Systemd:
    async def list_units(self, *patterns: str) -> list[UnitStatus]:
        return [UnitStatus(name=name, active_state=state, sub_state="running")
                for name, state in UNITS.items()
                if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]


def of_units(patterns: tuple[str, ...], running_only: bool = False) -> list[int]:
    return asyncio.run(ports.of_units(Systemd(), patterns,  # type: ignore[arg-type]
                                      running_only=running_only))


def test_every_loaded_unit_takes_its_port() -> None:
    assert of_units((instances.PATTERN, *control.PATTERNS)) == [8001, 8002, 8003, 8004]


def test_running_units_only() -> None:
    assert of_units((instances.PATTERN,), running_only=True) == [8001, 8003]
    assert of_units(control.PATTERNS, running_only=True) == [8001]
