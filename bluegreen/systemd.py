"""Everything bluegreen knows about systemd's D-Bus API, in one place.

Jobs are tracked the race-free way: the ``JobRemoved`` handler is installed (and the manager
subscribed) before any ``StartUnit``/``StopUnit`` call, and results of jobs that finish before
their method reply is read are kept until the caller asks for them. Changes of a unit's
ActiveState (systemd's PropertiesChanged signals) go to the listeners of ``on_unit_state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from bluegreen.files import atomic_write

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
SOCKET = "org.freedesktop.systemd1.Socket"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNIT_PATHS = "/org/freedesktop/systemd1/unit"
# Where programs put unit files and drop-ins that last until the next boot.
RUNTIME_UNITS = Path("/run/systemd/system")


class JobMode(StrEnum):
    REPLACE = "replace"
    FAIL = "fail"


class JobResult(StrEnum):
    DONE = "done"
    CANCELED = "canceled"
    TIMEOUT = "timeout"
    FAILED = "failed"
    DEPENDENCY = "dependency"
    SKIPPED = "skipped"


class ActiveState(StrEnum):
    ACTIVE = "active"
    RELOADING = "reloading"
    INACTIVE = "inactive"
    FAILED = "failed"
    ACTIVATING = "activating"
    DEACTIVATING = "deactivating"
    MAINTENANCE = "maintenance"
    REFRESHING = "refreshing"


CLD_EXITED = 1  # ExecMainCode of a process that exited (rather than being killed)


class SystemdError(Exception):
    """A call to systemd failed; the message says which unit and why."""


class NoSuchUnit(SystemdError):
    pass


class AccessDenied(SystemdError):
    pass


class JobFailed(SystemdError):
    def __init__(self, unit: str, verb: str, result: str, detail: str = "",
                 main_succeeded: bool = False) -> None:
        self.unit = unit
        self.result = result
        self.detail = detail
        # The unit's main process exited with status 0: what failed came after it (a
        # process it left behind outlived the stop timeout).
        self.main_succeeded = main_succeeded
        text = f"{verb} of {unit} ended with job result '{result}'"
        super().__init__(f"{text}: {detail}" if detail else text)


@dataclass(frozen=True)
class UnitStatus:
    name: str
    active_state: str
    sub_state: str
    result: str = ""
    exec_main_status: int = 0
    exec_main_code: int = 0
    uid: int = -1  # the user its processes run as (dynamic users included); -1: unknown
    restarts: int = 0  # automatic restarts (Restart=) since it was last started

    @property
    def main_succeeded(self) -> bool:
        return self.exec_main_code == CLD_EXITED and self.exec_main_status == 0

    @property
    def is_running(self) -> bool:
        return self.active_state in (ActiveState.ACTIVE, ActiveState.RELOADING, ActiveState.ACTIVATING)

    def describe_failure(self) -> str:
        """Why the unit is not running, in systemd's words (e.g. "exit-code, status 4")."""
        if self.result and self.result != "success":
            if self.result == "exit-code":
                return f"exited with status {self.exec_main_status}"
            if self.result == "signal":
                return f"killed by signal {self.exec_main_status}"
            return self.result
        return f"{self.active_state} ({self.sub_state})"


_ERRORS: dict[str, type[SystemdError]] = {
    "org.freedesktop.systemd1.NoSuchUnit": NoSuchUnit,
    "org.freedesktop.DBus.Error.AccessDenied": AccessDenied,
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": AccessDenied,
}


class Systemd:
    """A client of the service manager on an already connected system bus."""

    def __init__(self, bus: MessageBus, runtime_units: Path = RUNTIME_UNITS) -> None:
        self.bus = bus
        self.runtime_units = runtime_units
        self._waiting: dict[str, asyncio.Future[str]] = {}
        # Jobs that finished before anyone waited for them (their reply was still in flight).
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._subscribed = False
        # Called with (unit name, new ActiveState) whenever a unit's active state changes.
        self.on_unit_state: list[Callable[[str, str], None]] = []

    async def subscribe(self) -> None:
        """Install the JobRemoved handler and subscribe; call once before any job."""
        if self._subscribed:
            return
        self.bus.add_message_handler(self._on_message)
        await self._call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
            [f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',interface='{MANAGER}',"
             "member='JobRemoved'"],
        )
        await self._call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
            [f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',"
             f"member='PropertiesChanged',path_namespace='{UNIT_PATHS}',arg0='{UNIT}'"],
        )
        await self._manager("Subscribe")
        self._subscribed = True

    def _on_message(self, message: Message) -> bool:
        if (message.message_type == MessageType.SIGNAL and message.interface == MANAGER
                and message.member == "JobRemoved"):
            _id, job, _unit, result = message.body
            future = self._waiting.pop(job, None)
            if future is not None:
                if not future.done():
                    future.set_result(result)
            else:
                self._finished[job] = result
                while len(self._finished) > 256:
                    self._finished.popitem(last=False)
        elif (message.message_type == MessageType.SIGNAL and message.interface == PROPERTIES
                and message.member == "PropertiesChanged" and message.body
                and message.body[0] == UNIT and "ActiveState" in message.body[1]
                and (message.path or "").startswith(UNIT_PATHS + "/")):
            name = unit_name_of_path(message.path)
            state = message.body[1]["ActiveState"].value
            for listener in self.on_unit_state:
                try:
                    listener(name, state)
                except Exception:
                    log.exception("a listener of %s's state failed", name)
        return False

    async def _call(self, destination: str, path: str, interface: str, member: str,
                    signature: str = "", body: list[Any] | None = None,
                    unix_fds: list[int] | None = None) -> list[Any]:
        reply = await self.bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=body or [], unix_fds=unix_fds or [],
        ))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise _ERRORS.get(reply.error_name or "", SystemdError)(f"{member}: {text}")
        return list(reply.body)

    async def _manager(self, member: str, signature: str = "", *args: Any) -> list[Any]:
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER, member, signature, list(args))

    async def _run_job(self, verb: str, unit: str, mode: JobMode, timeout: float) -> str:
        if not self._subscribed:
            await self.subscribe()
        (job,) = await self._manager(verb, "ss", unit, mode.value)
        return await self._job_result(job, verb, unit, timeout)

    async def _job_result(self, job: str, verb: str, unit: str, timeout: float) -> str:
        result = self._finished.pop(job, None)
        if result is not None:
            return result
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[job] = future
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise SystemdError(f"{verb} of {unit}: no result from systemd within {timeout:g} s") from None
        finally:
            self._waiting.pop(job, None)

    async def start_unit(self, unit: str, *, timeout: float = 120.0,
                         mode: JobMode = JobMode.REPLACE) -> None:
        """Start a unit and wait for its job; raise JobFailed with the unit's own reason."""
        result = await self._run_job("StartUnit", unit, mode, timeout)
        if result != JobResult.DONE:
            status = await self.status(unit)
            raise JobFailed(unit, "start", result, status.describe_failure())

    async def stop_unit(self, unit: str, *, timeout: float = 900.0,
                        mode: JobMode = JobMode.REPLACE) -> None:
        """Stop a unit and wait until it is down; a unit that is not loaded is already stopped."""
        try:
            result = await self._run_job("StopUnit", unit, mode, timeout)
        except NoSuchUnit:
            return
        if result != JobResult.DONE:
            raise JobFailed(unit, "stop", result)

    async def reload_unit(self, unit: str, *, timeout: float = 60.0) -> None:
        """Reload a unit (its ExecReload=) and wait for the job."""
        result = await self._run_job("ReloadUnit", unit, JobMode.REPLACE, timeout)
        if result != JobResult.DONE:
            status = await self.status(unit)
            raise JobFailed(unit, "reload", result, status.describe_failure())

    async def processes(self, unit: str) -> tuple[int, set[int]]:
        """A service's main process and every process of its control group (0 and none once
        it is stopped)."""
        (path,) = await self._manager("LoadUnit", "s", unit)
        (main,) = await self._call(SYSTEMD, path, PROPERTIES, "Get", "ss", [SERVICE, "MainPID"])
        try:
            (processes,) = await self._manager("GetUnitProcesses", "s", unit)
        except SystemdError:  # not active: no control group
            return 0, set()
        return main.value, {pid for _cgroup, pid, _command in processes}

    async def run_transient(self, unit: str, properties: list[tuple[str, Variant]], *,
                            unix_fds: list[int] | None = None, timeout: float = 900.0) -> None:
        """Start a transient unit (a Type=oneshot service) and wait until its command is done.

        Raises JobFailed with the unit's own reason if the command failed or timed out. ``h``
        properties hold indexes into ``unix_fds``. With ``AddRef`` and ``CollectMode`` among
        the properties, the unit stays loaded until its outcome is read, then goes (as
        ``systemd-run --wait --collect`` does); a controller that dies meanwhile drops its
        reference with its bus connection.
        """
        if not self._subscribed:
            await self.subscribe()
        (job,) = await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "StartTransientUnit",
                                  "ssa(sv)a(sa(sv))",
                                  [unit, JobMode.FAIL.value, [list(p) for p in properties], []],
                                  unix_fds)
        try:
            try:
                result = await self._job_result(job, "StartTransientUnit", unit, timeout)
            except asyncio.CancelledError:
                with contextlib.suppress(SystemdError):
                    await asyncio.shield(self.stop_unit(unit, timeout=60))
                raise
            if result != JobResult.DONE:
                status = await self.status(unit)
                raise JobFailed(unit, "run", result, status.describe_failure(),
                                main_succeeded=status.main_succeeded)
        finally:
            with contextlib.suppress(SystemdError):  # already gone: nothing to release
                await asyncio.shield(self._manager("UnrefUnit", "s", unit))

    async def set_properties(self, unit: str, properties: list[tuple[str, Variant]]) -> None:
        """Change properties of a (loaded) unit until the next reboot, as systemctl
        set-property --runtime does; they apply from its next start."""
        await self._manager("SetUnitProperties", "sba(sv)", unit, True, [list(p) for p in properties])

    async def set_dropin(self, unit: str, name: str, text: str) -> None:
        """Give one unit settings that set_properties cannot change: a drop-in ``name`` of
        the unit in /run/systemd/system (gone at reboot), in force from its next start.

        systemd 252 takes execution settings such as LoadCredential= over D-Bus for transient
        units only. It reads a unit's drop-ins when it loads the unit: a loaded unit (running,
        failed, or held by a reference) sees a changed drop-in after a daemon-reload only, and
        one in a drop-in directory made since the last reload not even as a change
        (NeedDaemonReload stays false). So the file is written if it differs, and systemd
        reloaded only if what it has loaded is not that file.
        """
        path = self.runtime_units / f"{unit}.d" / name
        try:
            current: str | None = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            atomic_write(path, text)
        if await self._sees_dropin(unit, path):
            return
        log.info("reloading systemd's configuration: %s has a new drop-in", unit)
        await self._manager("Reload")  # answered once the reload is done
        if not await self._sees_dropin(unit, path):
            raise SystemdError(f"{unit}: systemd does not read its drop-in {path}")

    def remove_dropin(self, unit: str, name: str) -> None:
        """Remove a drop-in set_dropin wrote (and its directory, if nothing else is in it). A
        unit that is still loaded keeps what it has read until systemd reloads."""
        directory = self.runtime_units / f"{unit}.d"
        (directory / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # gone already, or holds another drop-in
            directory.rmdir()

    async def _sees_dropin(self, unit: str, path: Path) -> bool:
        (unit_path,) = await self._manager("LoadUnit", "s", unit)
        (dropins,) = await self._call(SYSTEMD, unit_path, PROPERTIES, "Get", "ss", [UNIT, "DropInPaths"])
        (stale,) = await self._call(SYSTEMD, unit_path, PROPERTIES, "Get", "ss", [UNIT, "NeedDaemonReload"])
        return str(path) in dropins.value and not stale.value

    async def reset_failed(self, unit: str) -> None:
        with contextlib.suppress(SystemdError):  # not failed, or not loaded: nothing to reset
            await self._manager("ResetFailedUnit", "s", unit)

    async def status(self, unit: str) -> UnitStatus:
        (path,) = await self._manager("LoadUnit", "s", unit)
        (props,) = await self._call(SYSTEMD, path, PROPERTIES, "GetAll", "s", [UNIT])
        service: dict[str, Variant] = {}
        if unit.endswith(".service"):
            (service,) = await self._call(SYSTEMD, path, PROPERTIES, "GetAll", "s", [SERVICE])

        def value(table: dict[str, Variant], key: str, default: Any) -> Any:
            return table[key].value if key in table else default

        return UnitStatus(
            name=unit,
            active_state=value(props, "ActiveState", ""),
            sub_state=value(props, "SubState", ""),
            result=value(service, "Result", ""),
            exec_main_status=value(service, "ExecMainStatus", 0),
            exec_main_code=value(service, "ExecMainCode", 0),
            uid=_uid(value(service, "UID", 0xFFFFFFFF)),
            restarts=value(service, "NRestarts", 0),
        )

    async def socket_listens(self, unit: str) -> tuple[str, list[str]]:
        """A socket unit's active state and the addresses of its ListenStream= lines, as its
        configuration (after the last daemon-reload) has them."""
        (path,) = await self._manager("LoadUnit", "s", unit)
        (state,) = await self._call(SYSTEMD, path, PROPERTIES, "Get", "ss", [UNIT, "ActiveState"])
        (listen,) = await self._call(SYSTEMD, path, PROPERTIES, "Get", "ss", [SOCKET, "Listen"])
        return state.value, [address for kind, address in listen.value if kind == "Stream"]

    async def list_units(self, *patterns: str) -> list[UnitStatus]:
        """Loaded units matching the glob patterns, whatever their state."""
        (units,) = await self._manager("ListUnitsByPatterns", "asas", [], list(patterns))
        return [UnitStatus(name=u[0], active_state=u[3], sub_state=u[4])
                for u in units]


def unit_name_of_path(path: str) -> str:
    """The unit an object path of systemd's names (its last element, each byte that is not a
    letter or digit escaped as _XX)."""
    escaped = path.rsplit("/", 1)[-1]
    out = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "_" and i + 2 < len(escaped):
            out.append(int(escaped[i + 1:i + 3], 16))
            i += 3
        else:
            out += escaped[i].encode()
            i += 1
    return out.decode(errors="replace")


def _uid(value: int) -> int:
    return -1 if value == 0xFFFFFFFF else value

