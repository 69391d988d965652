"""The controller's state of what serves: a deploy moves it, reconciliation reads it back from
systemd."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Serving:
    """What the public port reaches: a release running on one or more instance ports.

    ``port`` is the first instance's (its workers are named after it); ``others`` are the
    ports of the release's other instances (app.instances > 1).
    """

    port: int
    release: str
    others: tuple[int, ...] = ()

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, *self.others)

    @staticmethod
    def of(ports: tuple[int, ...] | list[int], release: str) -> Serving:
        first, *others = sorted(ports)
        return Serving(first, release, tuple(others))

    def describe(self) -> str:
        if not self.others:
            return f"port {self.port}"
        return "ports " + ", ".join(str(port) for port in self.ports)
