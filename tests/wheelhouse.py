"""The wheelhouse of the example apps (examples/*/requirements.txt): every wheel their releases
need, so that pip in a test container, which has no network, installs them from a directory.

Built on the test host with the pip of Debian's /usr/bin/python3 (the interpreter the container
runs too, so the wheels' tags fit), binary wheels only (nothing is compiled), into
``$BLUEGREEN_TOOLS/wheelhouse``. Built once: a later call with the same pins returns at once.

    python3 tests/wheelhouse.py     # build it by hand; prints its path
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOOLS = Path(os.environ.get("BLUEGREEN_TOOLS", "/var/tmp/bluegreen-tools"))
STAMP = ".complete"


class WheelhouseError(Exception):
    pass


def requirement_files(scratch: Path) -> list[Path]:
    """Each example's requirements.txt, and the one of each variant (a patch the tests apply)
    that changes it. Variants whose requirements cannot install (on purpose) are left out."""
    files = []
    for requirements in sorted(EXAMPLES.glob("*/requirements.txt")):
        example = requirements.parent
        files.append(requirements)
        for patch in sorted((example / "variants").glob("*.patch")):
            if "+++ b/requirements.txt" not in patch.read_text():
                continue
            work = scratch / example.name / patch.stem
            work.mkdir(parents=True)
            shutil.copyfile(requirements, work / "requirements.txt")
            _run(["git", "apply", "--include=requirements.txt", str(patch)], cwd=work)
            files.append(work / "requirements.txt")
    return files


def pins(files: list[Path]) -> list[str]:
    lines = set()
    for path in files:
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.add(line.lower())
    return sorted(lines)


def pip_python() -> str:
    """A python3.X of the host's /usr/bin/python3 with pip: itself, or the tools' venv of it."""
    for python in ("/usr/bin/python3", str(TOOLS / "bin/python3")):
        if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return python
    raise WheelhouseError("no pip for /usr/bin/python3: install python3-pip, or run scripts/install-deps")


def build(destination: Path | None = None) -> Path:
    """Download every wheel the app's requirement files pin into ``destination`` (default
    $BLUEGREEN_TOOLS/wheelhouse) unless it already holds them; return its path."""
    destination = destination or TOOLS / "wheelhouse"
    destination.mkdir(parents=True, exist_ok=True)
    with open(destination / ".lock", "w") as lock, tempfile.TemporaryDirectory() as scratch:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once share one download
        files = requirement_files(Path(scratch))
        python = pip_python()
        wanted = "\n".join([_run([python, "-c", "import sys; print(sys.version)"]).strip(),
                            *pins(files)]) + "\n"
        stamp = destination / STAMP
        if stamp.exists() and stamp.read_text() == wanted:
            return destination
        stamp.unlink(missing_ok=True)
        # The host's pip configuration holds (its index, mirror, certificates) but not its
        # constraints (/etc/xdg/pip here caps unrelated packages): the pins are the constraint.
        env = {**os.environ, "PIP_CONSTRAINT": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        for requirements in files:
            _run([python, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                  "--dest", str(destination), "--requirement", str(requirements)], env=env)
        stamp.write_text(wanted)
    return destination


def describe(wheelhouse: Path) -> str:
    wheels = list(wheelhouse.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    return f"{wheelhouse}: {len(wheels)} wheels, {size / 1e6:.1f} MB"


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise WheelhouseError(f"{shlex.join(argv)} exited {result.returncode}:\n"
                              f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


if __name__ == "__main__":
    try:
        print(describe(build()))
    except WheelhouseError as error:
        sys.exit(str(error))
