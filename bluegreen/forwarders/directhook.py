"""The hooks of forwarder = "direct": each instance holds a listener on the public port, and
the steering program of the port's SO_REUSEPORT group decides which instance gets each new
connection. Runs in processes of their own, as root ("+"), never in the controller.

``joined MAINPID PUBLIC_PORT TARGET``
    bluegreen-app@TARGET.service's ExecStartPost=: gunicorn (MAINPID) holds its listener on
    the public port (bluegreen-app-public@TARGET.socket, passed by socket activation). Record
    it in the group (it joined the last slot when the socket unit bound it) and set the program
    again. Until a switch admits TARGET it gets nothing (see reuseport.Group.admitted); a
    gunicorn that systemd restarted gets again what it had.
``stopping PUBLIC_PORT TARGET``
    Its ExecStop=: TARGET's listeners are closing. gunicorn closes its copy when it stops (the
    last copy: the socket unit has stopped first), and the kernel then moves the group's last
    listener into the slot it leaves, hundreds of milliseconds before ExecStopPost= would set
    the program again: new connections would go meanwhile to the kernel's hash over every
    listener, the other old instances' included. So the program first gives nothing to the
    closing listeners nor to those a departure can move (reuseport.Group.
    program_across_leaves), which names the same listeners before and after the move; then
    the hook sends gunicorn ($MAINPID) the SIGTERM systemd would send after it, waits for its
    listeners to leave and attaches at once the program it made beforehand for the group as
    the move leaves it (a lone receiver in the last slot, which no program names both before
    and after the move, is steered to within about a millisecond of it).
``left PUBLIC_PORT TARGET``
    Its ExecStopPost=: a listener that closed has left its slot to the last one, and the
    program follows. A listener still there belongs to a gunicorn that died: systemd holds it
    (the socket unit) until it restarts, so the connections already queued wait there, and new
    ones are steered to the other instances meanwhile.
``steer PUBLIC_PORT``
    bluegreen-direct-steer@PUBLIC_PORT.service: set the program for what the controller wrote
    the group admits (a switch, a switch-back, an instance taken out).
``drain TARGET PUBLIC_PORT TIMEOUT``
    bluegreen-direct-drain@TARGET.service: once TARGET is no longer admitted (steered away),
    return when its listener's accept queue is empty and its processes hold no connection of
    the public port (keep-alive clients leave at their next request: the drain flag), or after
    TIMEOUT seconds, when the connections it still holds are closed from the kernel side, as
    a forwarder's stop cuts its own at the drain timeout. Its listener stays in the group,
    receiving nothing, until the instance stops: closing it under gunicorn would fail
    gunicorn's next accept().

Kept free of heavy imports: it starts at every instance start, stop and switch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

from bluegreen import sockdiag
from bluegreen.forwarders import hook, reuseport

POLL = 0.05
LEAVE_POLL = 0.0005  # until the move is followed, some connections may go to the wrong slot
STOP_WAIT = 35.0  # below the instance's TimeoutStopSec= (40 s), which bounds ExecStop=


def _listeners_of(pid: int, port: int) -> tuple[list[sockdiag.TcpSocket], dict[int, int]]:
    fds = sockdiag.socket_fds(pid)
    return sockdiag.held_by(sockdiag.listeners(port), fds.keys()), fds


def joined(pid: int, port: int, target: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            mine, fds = _listeners_of(pid, port)
        except (FileNotFoundError, ProcessLookupError):
            return "the instance has exited"
        if mine:
            break
        if time.monotonic() >= deadline:
            return f"the instance holds no listener on port {port} after {timeout:g} s"
        time.sleep(hook.POLL)
    done = []
    for sock in mine:
        copy = hook.copy_socket(pid, fds[sock.inode])
        try:
            with hook.records().port(port) as groups:
                group = groups.setdefault(sock.local_address, reuseport.Group(admitted=set()))
                if group.admitted is None:
                    group.admitted = set()
                present = hook._present(port, sock.local_address)
                # Unseen since the socket unit bound it: what else changed came before.
                group.reconcile([inode for inode in present
                                 if inode != sock.inode or inode in group.slots])
                group.join(sock.inode)
                group.closing.discard(sock.inode)  # a restarted gunicorn takes its share again
                group.targets[sock.inode], group.owners[sock.inode] = target, pid
                admitted = target in group.admitted
                done.append(f"{sock.local_address} (socket {sock.inode}, "
                            f"{'admitted' if admitted else 'not admitted yet'}): "
                            f"{hook.steer(group, via=copy, across_leaves=True)}")
        finally:
            copy.close()
    return "; ".join(done)


def left(port: int, target: int) -> str:
    """``target``'s listeners close (``stopping``), or have closed, or are held by systemd
    for a gunicorn that died (``left``): steer around them."""
    done = []
    with hook.records().port(port) as groups:
        for address, group in groups.items():
            group.reconcile(hook._present(port, address))
            held = [inode for inode in group.slots if group.targets.get(inode) == target]
            group.closing.update(held)
            if group.slots:
                done.append(f"{address}: {hook.steer(group, across_leaves=True)}")
    return "; ".join(done) or "no listener left on the port"


def stopping(port: int, target: int, pid: int | None = None, timeout: float = STOP_WAIT) -> str:
    """Steer around ``target``'s listeners (as ``left``) before gunicorn, ``pid``, closes
    them; then stop it (SIGTERM, what systemd sends after ExecStop=) and, as soon as they have
    left, attach the program made beforehand for the group as the kernel has then moved it;
    the record follows. Until its listeners leave, or it exits (systemd still holds them: a
    restart), or ``timeout`` seconds. A program that names the group's last slot cannot be
    right both before and after the kernel moves that listener (a lone receiver: app.instances
    lowered to 1), and ExecStopPost= comes hundreds of milliseconds after the move."""
    said = left(port, target)
    if pid is None:
        return said
    ready = _after_leaving(port, target)
    try:
        if not ready:
            return said
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return said
        deadline = time.monotonic() + timeout
        while ready:
            present = {sock.inode for sock in sockdiag.listeners(port)}
            for address in [address for address, (inodes, _code, _copy) in ready.items()
                            if not inodes & present]:
                _inodes, code, copy = ready.pop(address)
                with contextlib.closing(copy):
                    sockdiag.attach_reuseport_program(copy, code)
            if not ready:
                break
            if not _running(pid):
                return f"{said}; gunicorn exited, its listener is held by systemd"
            if time.monotonic() >= deadline:
                return f"{said}; gunicorn still listens {timeout:g} s after SIGTERM"
            time.sleep(LEAVE_POLL)
    finally:
        for _inodes, _code, copy in ready.values():
            copy.close()
    return f"{said}; its listeners left, then {steer(port)}"


def _after_leaving(port: int, target: int) -> dict[str, tuple[set[int], bytes, socket.socket]]:
    """For each group ``target`` has listeners in: those, the program for the group once they
    have left (the kernel's moves made), and a copy of a listener that stays, to set it
    through."""
    ready = {}
    with hook.records().port(port) as groups:
        for address, group in groups.items():
            inodes = {inode for inode in group.slots if group.targets.get(inode) == target}
            if not inodes or not group.exact:
                continue
            after = reuseport.Group.from_json(group.to_json())
            for inode in inodes:
                after.leave(inode)
            copy = hook._member_copy(after) if after.slots else None
            if copy is not None:
                ready[address] = (inodes, after.program_across_leaves(hook._retired(after)), copy)
    return ready


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def steer(port: int) -> str:
    done = []
    with hook.records().port(port) as groups:
        for address, group in groups.items():
            group.reconcile(hook._present(port, address))
            if group.slots:
                done.append(f"{address}: {hook.steer(group, across_leaves=True)}")
    return "; ".join(done) or "no listener on the port"


def unit_processes(unit: str) -> set[int]:
    """The processes of ``unit`` (by the last part of their cgroup)."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/cgroup", encoding="utf-8") as cgroup:
            if any(line.rstrip("\n").endswith(f"/{unit}") for line in cgroup):
                found.add(int(name))
    return found


def held_connections(target: int, port: int) -> tuple[int, list[sockdiag.TcpSocket]]:
    """What instance ``target`` still has of the public ``port``: how many connections wait
    in its listener's accept queue, and the connections its processes hold."""
    with hook.records().port(port) as groups:
        inodes = {inode for group in groups.values()
                  for inode, to in group.targets.items() if to == target}
    queued = sum(sock.rx_queue for sock in sockdiag.listeners(port) if sock.inode in inodes)
    held: set[int] = set()
    for pid in unit_processes(f"bluegreen-app@{target}.service"):
        with contextlib.suppress(OSError):
            held.update(sockdiag.socket_fds(pid))
    connected = [sock for sock in sockdiag.sockets(sockdiag.SERVED_STATES, port)
                 if sock.inode in held]
    return queued, connected


def drain(target: int, port: int, timeout: float) -> tuple[int, int]:
    """Wait for instance ``target`` to have nothing of the public ``port``; at ``timeout``, cut
    the connections it holds. Returns what was queued and cut then.

    The timeout runs from the drain's start, when the controller raised the instance's drain
    flag (a busy host takes a second or more to start this hook after it), else from now."""
    try:
        began = min(os.stat(hook.drain_flag(target)).st_mtime, time.time())
    except FileNotFoundError:
        began = time.time()
    deadline = time.monotonic() + max(0.0, began + timeout - time.time())
    while True:
        queued, connected = held_connections(target, port)
        if not queued and not connected:
            return 0, 0
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    for sock in connected:
        with contextlib.suppress(OSError):  # gone meanwhile
            sockdiag.destroy(sock)
    return queued, len(connected)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    usage = ("usage: python3 -m bluegreen.forwarders.directhook joined MAINPID PUBLIC_PORT TARGET\n"
             "       python3 -m bluegreen.forwarders.directhook stopping PUBLIC_PORT TARGET\n"
             "       python3 -m bluegreen.forwarders.directhook left PUBLIC_PORT TARGET\n"
             "       python3 -m bluegreen.forwarders.directhook steer PUBLIC_PORT\n"
             "       python3 -m bluegreen.forwarders.directhook drain TARGET PUBLIC_PORT TIMEOUT")
    shapes = {"joined": (int, int, int), "stopping": (int, int), "left": (int, int), "steer": (int,),
              "drain": (int, int, float)}
    try:
        verb, kinds = argv[0], shapes[argv[0]]
        if len(argv) != len(kinds) + 1:
            raise ValueError(argv)
        args = [kind(value) for kind, value in zip(kinds, argv[1:], strict=True)]
    except (IndexError, KeyError, ValueError):
        print(usage, file=sys.stderr)
        return 2
    try:
        if verb == "joined":
            pid, port, target = (int(a) for a in args)
            log(f"listening on port {port}: {joined(pid, port, target)}")
        elif verb == "stopping":
            port, target = (int(a) for a in args)
            main_pid = os.environ.get("MAINPID", "")  # systemd's, for ExecStop=; unset: none
            log(f"the instance on port {target} is leaving port {port}: "
                f"{stopping(port, target, int(main_pid) if main_pid.isdigit() else None)}")
        elif verb == "left":
            port, target = (int(a) for a in args)
            log(f"the instance on port {target} left port {port}: {left(port, target)}")
        elif verb == "steer":
            log(f"port {int(args[0])}: {steer(int(args[0]))}")
        else:
            started = time.monotonic()
            queued, connected = drain(int(args[0]), int(args[1]), args[2])
            took = time.monotonic() - started
            if queued or connected:
                log(f"drain: {queued} connections still queued after {took:.2f} s; "
                    f"{connected} still open closed")
            else:
                log(f"drained in {took:.2f} s")
    except OSError as exc:  # the instance serves all the same, steered or not
        log(f"{verb}: the listeners of the public port are not steered ({exc.strerror or exc})")
        return 1 if verb == "steer" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
