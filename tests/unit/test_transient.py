"""What a dead controller left running: each app's controller finds its own units by name."""

from __future__ import annotations

import asyncio
import fnmatch
from typing import Any

import pytest

from bluegreen.release import transient
from bluegreen.systemd import UnitStatus


class Units:
    """Transient units and their active states; a release phase ends after a few looks."""

    def __init__(self, units: dict[str, str], migrate_ends_after: int | None = 3) -> None:
        self.units = units
        self.stopped: list[str] = []
        self.looks = 0
        self.migrate_ends_after = migrate_ends_after

    async def list_units(self, *patterns: str) -> list[UnitStatus]:
        if any("migrate" in pattern for pattern in patterns):
            self.looks += 1
            if self.migrate_ends_after is not None and self.looks > self.migrate_ends_after:
                for name in [n for n in self.units if "-migrate-" in n]:
                    del self.units[name]  # ended, and collected
        return [UnitStatus(name, state, "start") for name, state in self.units.items()
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]

    async def stop_unit(self, unit: str, **_: Any) -> None:
        self.stopped.append(unit)
        self.units.pop(unit, None)


UNITS = {
    "bluegreen-build-blog-4-aaaaaa.service": "activating",
    "bluegreen-check-blog-4-bbbbbb.service": "activating",
    "bluegreen-migrate-blog-3-cccccc.service": "activating",
    "bluegreen-build-blog_two-5-dddddd.service": "activating",
    "bluegreen-build-default-6-eeeeee.service": "activating",
    "bluegreen-check-7-ffffff.service": "activating",  # named by an older version: no app
}


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transient, "ORPHAN_POLL", 0.01)
    monkeypatch.setattr(transient, "STOP_TIMEOUT", 0)


def test_an_apps_builds_are_stopped_and_its_release_phase_waited_for() -> None:
    units = Units(dict(UNITS))
    asyncio.run(transient.settle_orphans(units, "blog", timeout=30))  # type: ignore[arg-type]
    assert sorted(units.stopped) == ["bluegreen-build-blog-4-aaaaaa.service",
                                     "bluegreen-check-blog-4-bbbbbb.service"]
    assert units.looks == 4  # waited until the release phase had ended; never stopped it
    assert "bluegreen-build-blog_two-5-dddddd.service" in units.units  # another app's


def test_the_default_app_also_takes_the_units_of_older_versions() -> None:
    units = Units(dict(UNITS))
    asyncio.run(transient.settle_orphans(units, "default", timeout=30))  # type: ignore[arg-type]
    assert sorted(units.stopped) == ["bluegreen-build-default-6-eeeeee.service",
                                     "bluegreen-check-7-ffffff.service"]


def test_a_release_phase_past_its_timeout_is_stopped() -> None:
    units = Units(dict(UNITS), migrate_ends_after=None)
    asyncio.run(transient.settle_orphans(units, "blog", timeout=0.05))  # type: ignore[arg-type]
    assert "bluegreen-migrate-blog-3-cccccc.service" in units.stopped
