"""The names of bluegreen's API, shared by the daemon and its clients: the bus name, the
objects, the interfaces, the signals, and the errors with what each means over HTTP and as
bluegreenctl's exit status.

A client imports this module, never the daemon's: the HTTP API and bluegreenctl stay thin.
"""

from __future__ import annotations

from enum import Enum

from bluegreen.config import DEFAULT_APP as DEFAULT_APP

BUS_NAME = "org.bluegreen1"
OBJECT_PATH = "/org/bluegreen1"
INTERFACE = "org.bluegreen1.Manager"
APPS_INTERFACE = "org.bluegreen1.Apps"
STEP_SIGNAL = "DeploymentStep"
FINISHED_SIGNAL = "DeploymentFinished"

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_CONFIGURATION = 3
EXIT_NO_SUCH = 4
EXIT_BUSY = 5
EXIT_NOT_RUNNING = 6


def object_path(app: str) -> str:
    """The object of an app's Manager interface: OBJECT_PATH for bluegreen.toml's app."""
    return OBJECT_PATH if app == DEFAULT_APP else f"{OBJECT_PATH}/app/{app}"


class Error(Enum):
    """An error the API answers with: its D-Bus name, HTTP status and bluegreenctl exit status.

    Also the bus's own errors a client meets (the daemon not running, access denied)."""

    BUSY = ("org.bluegreen1.Error.Busy", 409, EXIT_BUSY)
    INVALID_REF = ("org.bluegreen1.Error.InvalidRef", 400, EXIT_USAGE)
    INVALID_ARGUMENT = ("org.bluegreen1.Error.InvalidArgument", 400, EXIT_USAGE)
    UNKNOWN_REF = ("org.bluegreen1.Error.UnknownRef", 422, EXIT_USAGE)
    REPOSITORY = ("org.bluegreen1.Error.Repository", 502, EXIT_FAILED)
    NOT_CONFIGURED = ("org.bluegreen1.Error.NotConfigured", 409, EXIT_FAILED)
    NO_SUCH_DEPLOYMENT = ("org.bluegreen1.Error.NoSuchDeployment", 404, EXIT_NO_SUCH)
    NO_ROLLBACK_TARGET = ("org.bluegreen1.Error.NoRollbackTarget", 404, EXIT_USAGE)
    NO_CANARY = ("org.bluegreen1.Error.NoCanary", 409, EXIT_FAILED)
    BAD_SIGNATURE = ("org.bluegreen1.Error.BadSignature", 401, EXIT_FAILED)
    BAD_CONFIGURATION = ("org.bluegreen1.Error.BadConfiguration", 500, EXIT_BAD_CONFIGURATION)
    RECORDS = ("org.bluegreen1.Error.Records", 507, EXIT_FAILED)
    NO_SUCH_APP = ("org.bluegreen1.Error.NoSuchApp", 404, EXIT_NO_SUCH)
    INVALID_ARGS = ("org.freedesktop.DBus.Error.InvalidArgs", 500, EXIT_FAILED)
    ACCESS_DENIED = ("org.freedesktop.DBus.Error.AccessDenied", 403, EXIT_FAILED)
    SERVICE_UNKNOWN = ("org.freedesktop.DBus.Error.ServiceUnknown", 503, EXIT_NOT_RUNNING)
    NAME_HAS_NO_OWNER = ("org.freedesktop.DBus.Error.NameHasNoOwner", 500, EXIT_NOT_RUNNING)
    NO_REPLY = ("org.freedesktop.DBus.Error.NoReply", 504, EXIT_FAILED)
    UNKNOWN_OBJECT = ("org.freedesktop.DBus.Error.UnknownObject", 500, EXIT_FAILED)
    UNKNOWN_METHOD = ("org.freedesktop.DBus.Error.UnknownMethod", 500, EXIT_FAILED)

    def __init__(self, dbus_name: str, http_status: int, exit_status: int) -> None:
        self.dbus_name = dbus_name
        self.http_status = http_status
        self.exit_status = exit_status

    @property
    def short_name(self) -> str:
        """The name's last part, as the HTTP API's answers carry it ("Busy")."""
        return self.dbus_name.rsplit(".", 1)[-1]

    @classmethod
    def named(cls, dbus_name: str) -> Error | None:
        return _BY_NAME.get(dbus_name)


_BY_NAME = {error.dbus_name: error for error in Error}
