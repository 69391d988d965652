"""ruff and mypy are part of the test suite (scripts/test installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("BLUEGREEN_TOOLS", "/var/tmp/bluegreen-tools")) / "bin"


def tool(name: str) -> str:
    path = TOOLS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/test, which installs it in {TOOLS.parent}")
    return found


def test_ruff() -> None:
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", [[], ["scripts/sandbox"], ["scripts/demo"], ["scripts/bench"]],
                         ids=["package-and-tests", "sandbox", "demo", "bench"])
def test_mypy(target: list[str]) -> None:
    # The scripts have no .py suffix and all are __main__: mypy checks them one at a time.
    result = subprocess.run([tool("mypy"), "--python-executable", "/usr/bin/python3",
                             "--cache-dir", "/dev/null", *target], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
