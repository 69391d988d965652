"""A release's commands (dependency install, build, import check, checks, migrations), each in a
transient systemd unit of its own, as ``systemd-run --wait --pipe --collect`` would run them.

Each command gets a fresh cgroup under systemd, not the controller's: whatever it leaves behind
(a daemon it forked) dies with the unit, ``MemoryMax=`` and ``TasksMax=`` bound it, and the
file system is read-only but for the paths named. Its output comes back over a pipe: every line
goes to the journal with the deployment's fields, and the last lines make the failure reason.

A unit outlives a controller that dies while it runs. The next controller finds the app's by
name (``bluegreen-KIND-APP-DEPLOYMENT-RANDOM.service``) before it deploys anything: it stops
builds and checks, whose work is thrown away with their staging directory or unfinished
environment, and waits for a release phase to end, since a migration cut short may leave a
schema half changed, and two must never run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_next import Variant

from bluegreen.config import DEFAULT_APP, Network
from bluegreen.log import fields
from bluegreen.systemd import ActiveState, JobFailed, Systemd, SystemdError

log = logging.getLogger("bluegreen.output")
status_log = logging.getLogger(__name__)

USEC = 1_000_000
MEMORY_MAX = 4 << 30
TASKS_MAX = 512
# What the processes a command leaves behind get between SIGTERM and SIGKILL.
STOP_TIMEOUT = 10
TAIL_LINES = 5
# How often a controller looks whether a release phase a dead one left running has ended.
ORPHAN_POLL = 0.5

# systemd's IPAddressAllow=localhost, as the (family, address, prefix length) triples of D-Bus.
_LOCALHOST = [(2, bytes([127, 0, 0, 0]), 8), (10, bytes(15) + b"\x01", 128)]
_ANY = [(2, bytes(4), 0), (10, bytes(16), 0)]


class CommandFailed(Exception):
    """A release command failed, timed out or could not start; ``reason`` says which and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Command:
    """One command of a release and the sandbox it runs in."""

    what: str  # for people: "release.build_command", "importing app:app"
    kind: str  # part of the unit's name: build, check, migrate
    argv: Sequence[str]
    directory: Path
    user: str
    timeout: float
    environment: Mapping[str, str] = field(default_factory=dict)
    writable: Sequence[Path] = ()
    state_directories: Sequence[str] = ()
    cache_directories: Sequence[str] = ()
    credentials: Sequence[tuple[str, str]] = ()
    network: Network = Network.ANY
    # Tasks its user may own at once: the user's other processes count too (the app's
    # instances, for a command run as the app).
    tasks_max: int = TASKS_MAX
    app: str = DEFAULT_APP  # whose command: part of the unit's name
    # A user namespace of its own: processes of the same user elsewhere (another app's
    # command) may then not read its /proc entries, its environment and credentials among them.
    private_users: bool = False

    def properties(self, output_fd_index: int) -> list[tuple[str, Variant]]:
        env = [f"{name}={value}" for name, value in self.environment.items()]
        properties = [
            ("Description", Variant("s", f"bluegreen: {self.what}")),
            ("Type", Variant("s", "oneshot")),
            ("ExecStart", Variant("a(sasb)", [[self.argv[0], list(self.argv), False]])),
            ("WorkingDirectory", Variant("s", str(self.directory))),
            ("User", Variant("s", self.user)),
            ("Group", Variant("s", self.user)),
            ("Environment", Variant("as", env)),
            ("UMask", Variant("u", 0o022)),
            ("StandardInput", Variant("s", "null")),
            ("StandardOutputFileDescriptor", Variant("h", output_fd_index)),
            ("StandardErrorFileDescriptor", Variant("h", output_fd_index)),
            # A oneshot's whole run is its start: TimeoutStartSec= bounds it (RuntimeMaxSec=
            # does not apply to Type=oneshot).
            ("TimeoutStartUSec", Variant("t", int(self.timeout * USEC))),
            # Once the command ends, whatever it forked (a daemon, a setsid'd grandchild) is
            # killed with the cgroup before the job completes; --collect: no unit is left.
            ("KillMode", Variant("s", "control-group")),
            ("TimeoutStopUSec", Variant("t", STOP_TIMEOUT * USEC)),
            ("CollectMode", Variant("s", "inactive-or-failed")),
            ("AddRef", Variant("b", True)),
            ("MemoryMax", Variant("t", MEMORY_MAX)),
            ("TasksMax", Variant("t", TASKS_MAX)),
            # The same bound where the pids controller is not delegated to this systemd (a
            # container on a hybrid hierarchy): the command's user may not own more tasks.
            ("LimitNPROC", Variant("t", self.tasks_max)),
            ("LimitNPROCSoft", Variant("t", self.tasks_max)),
            ("ProtectSystem", Variant("s", "strict")),
            ("ProtectHome", Variant("s", "yes")),
            ("PrivateTmp", Variant("b", True)),
            ("PrivateDevices", Variant("b", True)),
            ("NoNewPrivileges", Variant("b", True)),
            ("ProtectKernelTunables", Variant("b", True)),
            ("ProtectKernelModules", Variant("b", True)),
            ("ProtectControlGroups", Variant("b", True)),
            ("RestrictSUIDSGID", Variant("b", True)),
            ("ReadWritePaths", Variant("as", [str(path) for path in self.writable])),
        ]
        if self.state_directories:
            properties += [("StateDirectory", Variant("as", list(self.state_directories))),
                           ("StateDirectoryMode", Variant("u", 0o700))]
        if self.cache_directories:
            properties.append(("CacheDirectory", Variant("as", list(self.cache_directories))))
        if self.credentials:
            properties.append(("LoadCredential", Variant("a(ss)", [list(c) for c in self.credentials])))
        if self.private_users:
            properties.append(("PrivateUsers", Variant("b", True)))
        properties += network_properties(self.network)
        return properties


def network_properties(network: Network) -> list[tuple[str, Variant]]:
    """IPAddressDeny=/IPAddressAllow= for ``network`` (empty lists undo an earlier lockdown)."""
    if network == Network.LOOPBACK:
        deny, allow = _ANY, _LOCALHOST
    else:
        deny, allow = [], []
    return [("IPAddressDeny", Variant("a(iayu)", [list(e) for e in deny])),
            ("IPAddressAllow", Variant("a(iayu)", [list(e) for e in allow]))]


class _Output:
    """Reads a command's output line by line: to the journal, and the tail kept for errors."""

    def __init__(self, fd: int, log_fields: Mapping[str, Any]) -> None:
        self.fd = fd
        self.fields = dict(log_fields)
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.partial = b""
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self.read)

    def read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.close()
                return
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            for line in lines:
                self.line(line)

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if text:
            self.tail.append(text)
            log.info("%s", text, extra=self.fields)

    def close(self) -> None:
        if self.fd < 0:
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        if self.partial:
            self.line(self.partial)
            self.partial = b""
        os.close(self.fd)
        self.fd = -1

    def finish(self) -> str:
        """Read what is left, stop reading; return the tail as one line."""
        if self.fd >= 0:
            self.read()
            self.close()
        return "; ".join(self.tail)[-600:]


async def run(systemd: Systemd, command: Command, deployment_id: int | None = None) -> None:
    """Run ``command`` to its end; raise CommandFailed with its last lines if it fails."""
    unit = f"bluegreen-{command.kind}-{command.app}-{deployment_id or 0}-{secrets.token_hex(3)}.service"
    read_end, write_end = os.pipe()
    output = _Output(read_end, fields(deployment_id=deployment_id, unit=unit))
    try:
        try:
            await systemd.run_transient(unit, command.properties(0), unix_fds=[write_end],
                                        timeout=command.timeout + 60)
        finally:
            os.close(write_end)
    except JobFailed as exc:
        tail = output.finish()  # what the command wrote is in the pipe: it ended before its job
        if exc.detail == "timeout" and exc.main_succeeded:
            cause = f"it left processes behind that ignored SIGTERM for {STOP_TIMEOUT} s"
        elif exc.detail == "timeout":
            cause = f"timed out after {command.timeout:g} s"
        else:
            cause = exc.detail or exc.result
        raise CommandFailed(f"{command.what} failed ({cause})" + (f": {tail}" if tail else "")) from None
    finally:
        with contextlib.suppress(OSError):
            output.finish()


def _patterns(app: str, kinds: Sequence[str]) -> list[str]:
    patterns = [f"bluegreen-{kind}-{app}-*.service" for kind in kinds]
    if app == DEFAULT_APP:  # units of versions that named no app in them (an app name is no digit)
        patterns += [f"bluegreen-{kind}-[0-9]*.service" for kind in kinds]
    return patterns


async def settle_orphans(systemd: Systemd, app: str, timeout: float) -> None:
    """Stop the app's builds and checks a dead controller left running, and wait for its
    release phase to end (``timeout``: the longest it may run, after which it is stopped)."""
    for unit in await systemd.list_units(*_patterns(app, ("build", "check"))):
        status_log.warning("stopping %s, left running by a controller that stopped", unit.name,
                           extra=fields(unit=unit.name))
        await systemd.stop_unit(unit.name, timeout=STOP_TIMEOUT + 60)
    deadline = asyncio.get_running_loop().time() + timeout + STOP_TIMEOUT
    announced: set[str] = set()
    while True:
        running = [unit.name for unit in await systemd.list_units(*_patterns(app, ("migrate",)))
                   if unit.active_state not in (ActiveState.INACTIVE, ActiveState.FAILED)]
        if not running:
            return
        for name in set(running) - announced:
            status_log.warning("waiting for %s, a release phase left running by a controller "
                               "that stopped, to end before any deployment", name,
                               extra=fields(unit=name))
        announced.update(running)
        if asyncio.get_running_loop().time() > deadline:
            for name in running:
                status_log.error("stopping %s: it ran past release.timeout", name,
                                 extra=fields(unit=name))
                with contextlib.suppress(SystemdError):
                    await systemd.stop_unit(name, timeout=STOP_TIMEOUT + 60)
            return
        await asyncio.sleep(ORPHAN_POLL)
