"""forwarder = "direct": no process between the client and the app. Runs in the controller.

Each instance holds a listener on the public port beside its own port:
bluegreen-app-public@PORT.socket (ReusePort=yes), whose address the controller writes in a
drop-in before the instance starts, passed to gunicorn by socket activation with the
instance's own socket (gunicorn then serves every descriptor passed, and ignores --bind). The
listeners outlive a gunicorn that systemd restarts, as the instance's own one does.

All of them are one SO_REUSEPORT group, and its steering program is the switch (see
forwarders/reuseport.py; the slots are the same model as the socat forwarders'): a new
instance's listener joins before its health check and gets nothing; the switch admits it and
new connections go to the admitted instances alone; an instance no longer admitted keeps its
listener, receiving nothing, until it stops (its accept queue empties first, so no queued
connection is reset). The controller writes what the group admits in its record; the
programs are attached by hooks that run as root in units of their own (forwarders/
directhook.py): the controller holds no copy of the public port, nor the privileges to take
one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bluegreen.config import Config, Forwarder
from bluegreen.forwarders import reuseport
from bluegreen.systemd import Systemd

DROPIN = "50-bluegreen-public.conf"
HOOK = "/usr/bin/python3 -I -B -m bluegreen.forwarders.directhook"


def socket_unit(port: int) -> str:
    return f"bluegreen-app-public@{port}.socket"


def steer_unit(public_port: int) -> str:
    return f"bluegreen-direct-steer@{public_port}.service"


def drain_unit(port: int) -> str:
    return f"bluegreen-direct-drain@{port}.service"


def listen_stream(address: str, public_port: int) -> list[str]:
    """The socket unit's lines for the public port on ``address`` ("::": both stacks)."""
    if address == "::":
        return [f"ListenStream=[::]:{public_port}", "BindIPv6Only=both"]
    if ":" in address:
        return [f"ListenStream=[{address}]:{public_port}", "BindIPv6Only=ipv6-only"]
    return [f"ListenStream={address}:{public_port}"]


def socket_dropin(address: str, public_port: int) -> str:
    return "\n".join(["# Written by bluegreen.service: the public port this instance listens on.",
                      "[Socket]", *listen_stream(address, public_port), ""])


def service_dropin(public_port: int) -> str:
    return "\n".join([
        "# Written by bluegreen.service: the instance listens on the public port too.",
        "[Service]",
        "Sockets=bluegreen-app-public@%i.socket",
        f"ExecStartPost=+{HOOK} joined $MAINPID {public_port} %i",
        f"ExecStop=+{HOOK} stopping {public_port} %i",
        f"ExecStopPost=+{HOOK} left {public_port} %i",
        ""])


def instance_units(port: int) -> tuple[str, str]:
    return socket_unit(port), f"bluegreen-app@{port}.service"


async def prepare(systemd: Systemd, port: int, address: str, public_port: int) -> None:
    """Have the instance on ``port`` listen on the public port from its next start."""
    socket_name, service = instance_units(port)
    await systemd.set_dropin(socket_name, DROPIN, socket_dropin(address, public_port))
    await systemd.set_dropin(service, DROPIN, service_dropin(public_port))


def forget(systemd: Systemd, port: int) -> None:
    """The instance on ``port`` listens on its own port only (another forwarder, or stopped)."""
    for name in instance_units(port):
        systemd.remove_dropin(name, DROPIN)


def worker_connections(config: Config, worker_class: str) -> int | None:
    """gunicorn's worker_connections for an instance of ``config`` (None: gunicorn's default).

    With no forwarder, nothing else counts the connections: each instance's gthread workers
    share ports.max_connections, as each instance's own socat would allow it, and the
    connections past it wait in the listener's queue as they would in the forwarder's. A sync
    worker serves one connection at a time whatever it is told (the instance: app.workers at
    once); uvicorn's worker has no such limit but one that answers 503 at once (its
    limit_concurrency), which a queue is not: both keep gunicorn's defaults."""
    if config.forwarder != Forwarder.DIRECT or worker_class != "gthread":
        return None
    return -(-config.ports.max_connections // config.app.workers)


def records(run_dir: Path) -> reuseport.Records:
    return reuseport.Records(run_dir / "reuseport")


def admit(run_dir: Path, public_port: int, add: Iterable[int] = (), remove: Iterable[int] = (),
          only: Iterable[int] | None = None) -> None:
    """Change which instances the public port's groups admit: ``only`` these, or ``add`` and
    ``remove`` some."""
    with records(run_dir).port(public_port) as groups:
        for group in groups.values():
            admitted = set(only) if only is not None else set(group.admitted or ())
            group.admitted = (admitted | set(add)) - set(remove)


def targets(run_dir: Path, public_port: int) -> dict[int, bool]:
    """The instances whose listener is in the public port's groups, each with whether it is
    admitted (and not closing: dead, waiting for its restart)."""
    found: dict[int, bool] = {}
    with records(run_dir).port(public_port) as groups:
        for group in groups.values():
            if group.admitted is None:
                continue
            for inode in group.slots:
                target = group.targets.get(inode)
                if target is not None:
                    found[target] = found.get(target, False) or (
                        target in group.admitted and inode not in group.closing)
    return found


async def steer(systemd: Systemd, public_port: int) -> None:
    """Set the program for what the groups admit now; return once it is attached."""
    await systemd.start_unit(steer_unit(public_port))


async def drain(systemd: Systemd, port: int, timeout: float) -> None:
    """Return once the instance on ``port`` (no longer admitted) has no connection of the
    public port, queued or open, or after ``timeout`` seconds."""
    await systemd.start_unit(drain_unit(port), timeout=timeout + 60)
