"""bluegreen: zero-downtime blue-green deployments on one host, built from systemd's parts."""

import sys

__version__ = "0.1.0"

# Importing dbus-next also loads its GLib integration, and with it PyGObject when that is
# installed: megabytes that bluegreen's processes, all asyncio, never use.
sys.modules.setdefault("gi", None)  # type: ignore[arg-type]
