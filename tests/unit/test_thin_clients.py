"""The HTTP API and bluegreenctl are thin clients of the D-Bus API: they import the API's
names and the client, never the daemon's modules (its state, its deploy flow, systemd)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DAEMON = {"bluegreen.controller", "bluegreen.deploy", "bluegreen.reconcile", "bluegreen.systemd",
          "bluegreen.appmanager", "bluegreen.recovery", "bluegreen.front", "bluegreen.api.dbus"}


def imported_by(module: str) -> set[str]:
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            "print(json.dumps(sorted(name for name in sys.modules if name.startswith('bluegreen'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("client", ["bluegreen.api.http", "bluegreen.cli"])
def test_a_thin_client_imports_nothing_of_the_daemon(client: str) -> None:
    assert imported_by(client) & DAEMON == set()
