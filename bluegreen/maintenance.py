"""Maintenance: the front answers every request for an app's domains with a 503 page.

The page is a file, ``/var/lib/bluegreen/maintenance/APP.html``. The front's route for the app
looks for it on each request (Caddy's file matcher) and, while it is there, answers 503 with
``Retry-After`` and the page instead of passing the request on. Turning maintenance on or off
therefore writes or removes one file and never reloads the front: no other app's connection,
nor this app's own keep-alive ones, notice. The page lives in the state directory, so it
outlives a restart of bluegreen and of the host, as a user who turned it on would expect.

Only the front serves the page: the app's own port and bluegreen's health checks, which reach
the instances directly, are untouched, so a deploy during maintenance proves its release as
usual.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bluegreen.apps import STATE_DIR
from bluegreen.files import atomic_write, fsync_directory

DIRECTORY = "maintenance"
RETRY_AFTER = 60  # seconds, what the 503 asks clients to wait before they try again
DEFAULT_MESSAGE = "This site is down for maintenance and will be back shortly."
MAX_MESSAGE = 2000  # characters
_MESSAGE = re.compile(r'<p id="message">(.*?)</p>', re.S)


class MaintenanceError(Exception):
    """The request cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Maintenance:
    message: str
    since: float  # seconds since the epoch


def directory(root: Path = STATE_DIR) -> Path:
    """Readable by the front's user: the directory and each page are world-readable."""
    return root / DIRECTORY


def page(app: str, root: Path = STATE_DIR) -> Path:
    return directory(root) / f"{app}.html"


def render(message: str) -> str:
    """The page: the message, escaped, in a document that needs nothing else to show."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<title>Down for maintenance</title>\n"
        "<style>body{font-family:sans-serif;max-width:40em;margin:4em auto;padding:0 1em}</style>\n"
        "</head>\n<body>\n<h1>Down for maintenance</h1>\n"
        f'<p id="message">{html.escape(message)}</p>\n</body>\n</html>\n')


def check_message(message: str) -> str:
    """The message to show ("" means the default); a clear error for one that cannot be."""
    message = message.strip() or DEFAULT_MESSAGE
    if len(message) > MAX_MESSAGE:
        raise MaintenanceError(f"the maintenance message has {len(message)} characters; "
                               f"at most {MAX_MESSAGE} are shown")
    if any(ord(c) < 32 and c not in "\n\t" for c in message):
        raise MaintenanceError("the maintenance message holds control characters")
    return message


def turn_on(app: str, message: str, root: Path = STATE_DIR) -> Maintenance:
    """Put the app's page in place (whole, at once): from the next request on, the front
    answers with it."""
    text = render(check_message(message))
    where = directory(root)
    where.mkdir(mode=0o755, exist_ok=True)
    os.chmod(where, 0o755)  # the front's user must read it whatever the umask made of it
    atomic_write(page(app, root), text, mode=0o644)
    found = current(app, root)
    assert found is not None
    return found


def turn_off(app: str, root: Path = STATE_DIR) -> bool:
    """Remove the app's page; whether there was one."""
    path = page(app, root)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_directory(path.parent)
    return True


def current(app: str, root: Path = STATE_DIR) -> Maintenance | None:
    """The app's maintenance, None when it is off."""
    path = page(app, root)
    try:
        text = path.read_text(encoding="utf-8")
        since = path.stat().st_mtime
    except FileNotFoundError:
        return None
    found = _MESSAGE.search(text)
    return Maintenance(html.unescape(found.group(1)) if found else "", since)
