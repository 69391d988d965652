"""Start and stop hooks of bluegreen-forward@.service (runs inside the forwarder's unit).

``ready MAINPID PORT``
    ExecStartPost=: return once socat (MAINPID) listens on PORT, so the unit's start job
    completes only when the new forwarder really takes connections.
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

from bluegreen import cgroup, netstat

POLL = 0.02


def wait_listening(main_pid: int, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inodes = netstat.socket_inodes([main_pid])
        if any(s.inode in inodes for s in netstat.listeners(port)):
            return True
        try:
            os.kill(main_pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(POLL)
    return False


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
    usage = "usage: python3 -m bluegreen.forwardhook ready MAINPID PORT | drain MAINPID TIMEOUT"
    if len(argv) != 3 or argv[0] not in ("ready", "drain"):
        print(usage, file=sys.stderr)
        return 2
    try:
        main_pid, number = int(argv[1]), float(argv[2])
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "ready":
        if wait_listening(main_pid, int(number), timeout=10):
            return 0
        print(f"socat (pid {main_pid}) is not listening on port {int(number)}", file=sys.stderr)
        return 1
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
