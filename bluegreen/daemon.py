"""bluegreen.service: the controller daemon (``python3 -m bluegreen.daemon``).

Start-up: read the config of every app (refuse to start on a bad one), connect to the system
bus, export the API and take the bus name, adopt what systemd runs for each app, then tell
systemd READY=1; the rest of
the reconciliation, a deployment if nothing serves and the refresher go on in the background.
The watchdog is fed from the event loop, so a stuck loop gets the daemon restarted, and a
background task of the controller that ends unexpectedly makes it exit with status 1 (systemd
restarts it). SIGHUP, like the D-Bus method Reload (``systemctl reload bluegreen`` calls
``bluegreenctl reload``), reads the configuration again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from dbus_next import BusType, DBusError
from dbus_next.aio import MessageBus
from dbus_next.constants import RequestNameReply
from systemd import daemon as sd

from bluegreen import apps
from bluegreen import config as configuration
from bluegreen import log as logsetup
from bluegreen.api.dbus import AppsInterface, remember_sender
from bluegreen.api.names import BUS_NAME, OBJECT_PATH
from bluegreen.appmanager import AppManager
from bluegreen.credentials import Secrets
from bluegreen.parts import Paths
from bluegreen.systemd import Systemd

log = logging.getLogger("bluegreen")


def notify(*lines: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        sd.notify("\n".join(lines))


async def feed_watchdog() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(usec / 1_000_000 / 3)


def _quiet_replied_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # dbus-next 0.2.3 sends the error reply for a DBusError raised by an async method, then lets
    # the error escape from its callback too: the caller has its answer, nothing is wrong here.
    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


async def reload_quietly(manager: AppManager) -> None:
    """SIGHUP: reload as ``bluegreenctl reload`` does; a bad file is logged and changes nothing."""
    with contextlib.suppress(configuration.ConfigError):
        await manager.reload()


async def serve(configs: dict[str, configuration.Config], paths: Paths, apps_dir: Path) -> int:
    config = configs[configuration.DEFAULT_APP]
    # File descriptors ride on the bus: release commands' output comes back over a pipe.
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    systemd = Systemd(bus)
    await systemd.subscribe()
    manager = AppManager(systemd, paths, apps_dir, bus, secrets=Secrets.load(),
                         notify_status=lambda text: notify(f"STATUS={text}"), notify=notify)
    bus.add_message_handler(remember_sender)
    for app_config in configs.values():
        manager.add(app_config)
    bus.export(OBJECT_PATH, AppsInterface(lambda: list(manager.controllers)))
    reply = await own_name(bus)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("cannot own the bus name %s (%s): is another bluegreen running?", BUS_NAME,
                  reply.name)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_replied_errors)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def hangup() -> None:
        task = asyncio.create_task(reload_quietly(manager), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    watchdog = asyncio.create_task(feed_watchdog(), name="watchdog")
    disconnected = asyncio.create_task(bus.wait_for_disconnect(), name="bus")

    await manager.start()
    notify("READY=1")
    log.info("bluegreen is ready: public port %d, repository %s", config.ports.public,
             config.repository.url or "(none configured)")
    for name, other in list(manager.controllers.items())[1:]:
        settings = other.settings.in_effect
        log.info("app %s is ready: public port %d, repository %s", name, settings.ports.public,
                 settings.repository.url or "(none configured)")

    stopping = asyncio.create_task(stop.wait(), name="stop")
    broken = asyncio.create_task(manager.fatal.wait(), name="fatal")
    done, _ = await asyncio.wait({stopping, disconnected, broken},
                                 return_when=asyncio.FIRST_COMPLETED)
    notify("STOPPING=1", "STATUS=Stopping")
    await manager.stop()
    watchdog.cancel()
    if disconnected in done:
        log.error("lost the connection to the system bus")
        return 1
    if broken in done and stopping not in done:
        bus.disconnect()
        log.error("bluegreen stops after an internal error; the serving release keeps running")
        return 1
    bus.disconnect()
    log.info("bluegreen stopped; the serving release keeps running")
    return 0


NAME_WAIT = 10.0


async def own_name(bus: MessageBus) -> RequestNameReply:
    """Own BUS_NAME, waiting up to NAME_WAIT seconds in the bus's queue for it: at a restart
    the bus may not yet have seen the previous controller's connection close when this one
    asks (systemd starts it once that one has exited), and then queues the request."""
    reply = await bus.request_name(BUS_NAME)
    deadline = asyncio.get_running_loop().time() + NAME_WAIT
    while reply == RequestNameReply.IN_QUEUE and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        reply = await bus.request_name(BUS_NAME)
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bluegreen", description="The bluegreen controller (run by bluegreen.service).")
    parser.add_argument("--config", type=Path, default=configuration.DEFAULT_PATH,
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--apps-directory", type=Path, default=apps.APPS_DIR,
                        help="the other apps' files, NAME.toml (default: %(default)s)")
    parser.add_argument("--state-directory", type=Path,
                        default=Path(os.environ.get("STATE_DIRECTORY", "/var/lib/bluegreen")),
                        help="where releases and records live (default: $STATE_DIRECTORY)")
    parser.add_argument("--runtime-directory", type=Path,
                        default=Path(os.environ.get("RUNTIME_DIRECTORY", "/run/bluegreen")),
                        help="where instance settings live (default: $RUNTIME_DIRECTORY)")
    parser.add_argument("--check-config", action="store_true",
                        help="only validate the configuration and print it")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    logsetup.setup(verbose=args.verbose)
    try:
        configs = apps.load(args.config, args.apps_directory)
    except configuration.ConfigError as exc:
        log.error("refusing to start: %s", exc)
        notify(f"STATUS=Bad configuration: {exc}")
        return 78  # EX_CONFIG
    if args.check_config:
        for config in configs.values():
            print(config.to_json())
        return 0
    paths = Paths(state=args.state_directory, runtime=args.runtime_directory, config=args.config)
    return asyncio.run(serve(configs, paths, args.apps_directory))


if __name__ == "__main__":
    sys.exit(main())
