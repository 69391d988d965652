"""A client of bluegreen's D-Bus API, for the HTTP API and bluegreenctl."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from bluegreen.api.names import (
    APPS_INTERFACE,
    BUS_NAME,
    DEFAULT_APP,
    FINISHED_SIGNAL,
    INTERFACE,
    OBJECT_PATH,
    STEP_SIGNAL,
    Error,
    object_path,
)

T = TypeVar("T")

class ApiError(Exception):
    """The daemon (or the bus) refused a call; ``name`` is the D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(message)

    @property
    def error(self) -> Error | None:
        """The API's name for it (None for an error the API does not name)."""
        return Error.named(self.name)

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def http_status(self) -> int:
        return self.error.http_status if self.error else 500

    @classmethod
    def of(cls, error: Error, message: str) -> ApiError:
        return cls(error.dbus_name, message)


def plain(value: Any) -> Any:
    """D-Bus values with their Variants unwrapped, fit for JSON."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def deployment(raw: dict[str, Any]) -> dict[str, Any]:
    """A deployment as returned over D-Bus, reshaped for people and JSON."""
    data: dict[str, Any] = plain(raw)
    data["steps"] = [{"step": s, "started": a, "finished": b or None} for s, a, b in data["steps"]]
    data["finished_at"] = data["finished_at"] or None
    data["duration"] = (data["finished_at"] - data["started_at"]) if data["finished_at"] else None
    return data


# What the bus answers for an object nobody exports (dbus-next's words for it).
_NO_OBJECT = (Error.UNKNOWN_OBJECT.dbus_name, Error.UNKNOWN_METHOD.dbus_name)


class Client:
    """A connection to the API of one app (``app``; DEFAULT_APP: bluegreen.toml's)."""

    def __init__(self, bus: MessageBus, app: str = DEFAULT_APP) -> None:
        self.bus = bus
        self.app = app
        self.path = object_path(app)

    @classmethod
    async def connect(cls, app: str = DEFAULT_APP) -> Client:
        return cls(await MessageBus(bus_type=BusType.SYSTEM).connect(), app)

    def close(self) -> None:
        self.bus.disconnect()

    async def _call(self, member: str, signature: str = "", body: list[Any] | None = None,
                    interface: str = INTERFACE, path: str = "") -> list[Any]:
        reply = await self.bus.call(Message(destination=BUS_NAME, path=path or self.path,
                                            interface=interface, member=member,
                                            signature=signature, body=body or []))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            if reply.error_name == Error.SERVICE_UNKNOWN.dbus_name:
                text = "bluegreen is not running (start it with: systemctl start bluegreen)"
            elif reply.error_name in _NO_OBJECT and not path and self.app != DEFAULT_APP:
                raise ApiError.of(Error.NO_SUCH_APP,
                               f"no app {self.app!r} (bluegreenctl apps lists them)")
            raise ApiError(reply.error_name or "", str(text))
        return list(reply.body)

    async def apps(self) -> list[str]:
        """The names of the apps, the default app first."""
        (raw,) = await self._call("ListApps", interface=APPS_INTERFACE, path=OBJECT_PATH)
        return [name for name, _path in raw]

    async def app_statuses(self) -> dict[str, dict[str, Any]]:
        """Every app's status (its Manager object's properties), by name, the default app first."""
        return {name: await Client(self.bus, name).status() for name in await self.apps()}

    async def deploy(self, ref: str = "", trigger: str = "dbus", wait: bool = False,
                     canary: float | None = None) -> str:
        options = {"trigger": Variant("s", trigger), "wait": Variant("b", wait)}
        if canary is not None:
            options["canary"] = Variant("d", canary)
        (deployment_id,) = await self._call("DeployWithOptions", "sa{sv}", [ref, options])
        return str(deployment_id)

    async def rollback(self, target: str = "", trigger: str = "dbus", wait: bool = False) -> str:
        options = {"trigger": Variant("s", trigger), "wait": Variant("b", wait)}
        (deployment_id,) = await self._call("RollbackWithOptions", "sa{sv}", [target, options])
        return str(deployment_id)

    async def promote(self) -> str:
        """End the canary under way with a promotion; its deployment's id."""
        (deployment_id,) = await self._call("Promote")
        return str(deployment_id)

    async def reload(self) -> list[dict[str, str]]:
        (raw,) = await self._call("Reload")
        return [{"key": key, "applies": when} for key, when in raw]

    async def pending_settings(self) -> list[dict[str, str]]:
        (raw,) = await self._call("ListPendingSettings")
        return [{"key": key, "applies": when} for key, when in raw]

    async def refresh(self) -> None:
        await self._call("Refresh")

    async def notify_push(self, payload: bytes, signature: str) -> None:
        await self._call("NotifyPush", "ays", [payload, signature])

    async def metrics(self) -> str:
        (text,) = await self._call("GetMetrics")
        return str(text)

    async def status(self) -> dict[str, Any]:
        (props,) = await self._call("GetAll", "s", [INTERFACE],
                                    interface="org.freedesktop.DBus.Properties")
        return dict(plain(props))

    async def canary(self) -> dict[str, Any]:
        """The canary under way, as the Canary property says ({} when none runs)."""
        (value,) = await self._call("Get", "ss", [INTERFACE, "Canary"],
                                    interface="org.freedesktop.DBus.Properties")
        return dict(plain(value))

    async def deployment(self, deployment_id: str) -> dict[str, Any]:
        (raw,) = await self._call("GetDeployment", "s", [deployment_id])
        return deployment(raw)

    async def deployments(self, limit: int = 20) -> list[dict[str, Any]]:
        (raw,) = await self._call("ListDeployments", "u", [limit])
        return [deployment(item) for item in raw]

    async def instances(self) -> list[dict[str, Any]]:
        (raw,) = await self._call("ListInstances")
        return [{"port": port, "state": state, "release": release} for port, state, release in raw]

    async def workers(self) -> list[dict[str, Any]]:
        (raw,) = await self._call("ListWorkers")
        return [{"port": port, "name": name, "state": state, "release": release}
                for port, name, state, release in raw]

    async def domains(self) -> list[dict[str, Any]]:
        """The app's domains, each with its certificate's issuer and expiry (None without one)
        or the reason it has none."""
        (raw,) = await self._call("ListDomains")
        return [{"domain": domain, "issuer": issuer, "expires": expires or None, "reason": reason}
                for domain, issuer, expires, reason in raw]

    async def set_maintenance(self, on: bool, message: str = "") -> None:
        await self._call("SetMaintenance", "bs", [on, message])

    async def follow(self, start: Callable[[], Awaitable[str]],
                     on_step: Callable[[str, str, int], None] = lambda step, release, port: None,
                     ) -> dict[str, Any]:
        """Call ``start`` (which returns a deployment id), report each step of that deployment
        as it happens, and return its record once it has finished.

        The signal match is in place before ``start`` runs, so no step is missed.
        """
        events: asyncio.Queue[tuple[str, list[Any]]] = asyncio.Queue()

        def handler(message: Message) -> bool:
            if (message.message_type == MessageType.SIGNAL and message.interface == INTERFACE
                    and message.path == self.path):  # ids are per app: another app's are not ours
                events.put_nowait((message.member or "", list(message.body)))
            return False

        self.bus.add_message_handler(handler)
        await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',sender='{BUS_NAME}',interface='{INTERFACE}',path='{self.path}'"]))
        try:
            deployment_id = await start()
            while True:
                try:
                    member, body = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    record = await self.deployment(deployment_id)
                    if record["state"] != "running":
                        return record  # it ended before we started listening
                    continue
                if not body or body[0] != deployment_id:
                    continue
                if member == STEP_SIGNAL:
                    on_step(body[1], body[2], body[3])
                elif member == FINISHED_SIGNAL:
                    return await self.deployment(deployment_id)
        finally:
            self.bus.remove_message_handler(handler)


def call(function: Callable[[Client], Awaitable[T]], app: str = DEFAULT_APP) -> T:
    """Run one async client call from synchronous code, on a connection of its own."""

    async def once() -> T:
        client = await Client.connect(app)
        try:
            return await function(client)
        finally:
            client.close()

    return asyncio.run(once())
