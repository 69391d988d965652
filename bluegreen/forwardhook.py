"""The stop hook of bluegreen-forward@.service (runs inside the forwarder's unit).

``drain MAINPID TIMEOUT``
    ExecStop=: SIGTERM to socat's listening process only. Its listener closes and the kernel
    moves the connections still queued on it to the other forwarder (net.ipv4.tcp_migrate_req=1),
    while the per-connection children finish the requests in flight. Return once they are all
    gone, or after TIMEOUT seconds; systemd then kills whatever is left.

Kept free of heavy imports: it starts on every switch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from bluegreen import cgroup

POLL = 0.02


def drain(main_pid: int, timeout: float) -> int:
    """Close the listener and wait for the connections in flight; return how many were cut."""
    me = os.getpid()
    group = cgroup.own_cgroup()
    with contextlib.suppress(ProcessLookupError):
        os.kill(main_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        others = cgroup.pids(group) - {me}
        if not others or time.monotonic() >= deadline:
            return len(others)
        time.sleep(POLL)


def main(argv: list[str]) -> int:
    usage = "usage: python3 -m bluegreen.forwardhook drain MAINPID TIMEOUT"
    if len(argv) != 3 or argv[0] != "drain":
        print(usage, file=sys.stderr)
        return 2
    try:
        main_pid, number = int(argv[1]), float(argv[2])
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    started = time.monotonic()
    left = drain(main_pid, number)
    took = time.monotonic() - started
    if left:
        print(f"drain: {left} connection processes still open after {took:.2f} s; "
              "systemd stops them", file=sys.stderr)
    else:
        print(f"drained in {took:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
