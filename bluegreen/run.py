"""The one place bluegreen starts a process: argv lists, stdin from /dev/null, a minimal env."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# What a child gets from us; everything else it needs is passed explicitly.
_INHERITED = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")


class CommandError(Exception):
    """A command failed or timed out; ``reason`` is one line a person can act on."""

    def __init__(self, argv: Sequence[str], reason: str, output: str = "") -> None:
        self.argv = list(argv)
        self.reason = reason
        self.output = output
        super().__init__(f"{argv[0]} failed: {reason}")


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra or {})
    return env


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _tail(text: str) -> str:
    """The end of a command's complaint: its last three lines (git, say, gives the cause
    before the summary: "...: No space left on device; fatal: unpack-objects failed")."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines[-3:])[-400:]


async def run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = True,
) -> Completed:
    """Run argv to completion; raise CommandError on a non-zero exit (if check) or a timeout.

    On a timeout the command's whole process group is killed. (A release's own commands run
    in transient units instead: see release/transient.py.)
    """
    log.debug("running %s", shlex.join(argv))
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=minimal_env(env),
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandError(argv, f"cannot execute: {exc.strerror}") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        _kill_group(process)
        await process.wait()
        raise CommandError(argv, f"timed out after {timeout:g} s") from None
    except asyncio.CancelledError:
        if process.returncode is None:
            _kill_group(process)
            await process.wait()
        raise
    result = Completed(
        process.returncode if process.returncode is not None else -1,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        detail = _tail(result.stderr) or _tail(result.stdout) or "no output"
        raise CommandError(argv, f"exit status {result.returncode}: {detail}", result.stderr)
    return result
