"""The controller's state of what serves: a deploy moves it, reconciliation reads it back from
systemd."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Serving:
    """What the public port reaches: a release running on an instance port."""

    port: int
    release: str
