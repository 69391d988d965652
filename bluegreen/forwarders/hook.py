"""The hooks of bluegreen-forward@.service. Runs in processes of their own, as root in the
forwarder's cgroup (ExecStartPost=+ and ExecStop=+; ExecStartPost= of bluegreen-proxy@ too),
never in the controller.

``joined MAINPID PUBLIC_PORT TARGET``
    Once socat listens, record its listener in the public port's SO_REUSEPORT group and set the
    group's steering program again (see forwarders/reuseport.py), then keep a copy of it in
    the unit's file descriptor store.
``drain MAINPID TIMEOUT``
    Close socat's listening socket from the kernel side, then return once every other process
    of the unit (socat's per-connection children) has finished, or after TIMEOUT seconds;
    systemd then stops whatever is left.

socat accepts a connection and only then forks the child that serves it. A signal to socat
between the two would kill the only holder of that connection and reset its client, so the
listener is closed without touching socat: a sock_diag SOCK_DESTROY of that one socket (what
``ss -K`` does; CAP_NET_ADMIN). The kernel moves the connections still queued on it to another
listener of the port (net.ipv4.tcp_migrate_req=1); socat forks for the connection it holds,
if any, and its next accept() fails with EINVAL, on which it exits 1 by itself.

Only the listeners socat's main process holds are closed, found by their inodes in
/proc/MAINPID/fd: the other forwarders listen on the same port (SO_REUSEPORT). Before that, new
connections are steered away from it through a copy of socat's descriptor (pidfd_getfd and
the group's program, see forwarders/reuseport.py): a listener closed while the kernel completes a
handshake on it can lose that connection, and a moment later it has none left. The program
gives new connections to the listeners that should have them: not one closing, nor one whose
instance is being retired (its drain flag is up: the old release, while its forwarders drain
one after the other), hashing across them when there are several. Right after the close the
kernel has moved the group's last listener into the slot left, and the program is set again
to follow it. Without SOCK_DESTROY (a kernel without CONFIG_INET_DIAG_DESTROY) the listener is
shut down through that copy (shutdown(SHUT_RD)), which closes it the same way. Only if both
fail does socat get a SIGTERM, as before, and the journal says so.

A forwarder that dies (a crash, a kill) must not leave the public port free while systemd
restarts it: another local user could bind it and be given the port's traffic, and clients
would be refused. So the listener outlives socat: ``joined`` hands a copy of it to systemd
(``FDSTORE=1``, ``FileDescriptorStoreMax=`` of the unit), which keeps it across the restart.
The port stays bound by the forwarder's user, and connections wait in its queue. systemd
passes the stored copy to the next socat, which does not know it (``LISTEN_FDS``); once that
socat listens, ``joined`` closes the stored listener like a drain, which moves its queue to
the new one, and stores the new one in its place. A stop flushes the store.

Kept free of heavy imports: it starts on every switch.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from bluegreen import cgroup, sockdiag
from bluegreen.forwarders import reuseport

POLL = 0.02
STORED = "listener"  # FDNAME= of the listener kept in the unit's file descriptor store
SYS_PIDFD_GETFD = 438  # the same number on x86-64, arm64 and the other asm-generic ABIs
RUN_DIR = Path("/run/bluegreen")  # the controller's: forwarder.env, the drain flags


def records() -> reuseport.Records:
    return reuseport.Records(RUN_DIR / "reuseport")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def copy_socket(pid: int, fd: int) -> socket.socket:
    """A copy of listening socket ``fd`` of process ``pid`` (pidfd_getfd: CAP_SYS_PTRACE)."""
    import ctypes  # Python 3.11 has no os.pidfd_getfd

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=copy)
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise OSError(errno.EINVAL, f"descriptor {fd} of process {pid} does not listen")
    return sock


def _present(port: int, address: str) -> list[int]:
    """The listeners of the group of ``port`` on ``address`` now, by inode."""
    return [sock.inode for sock in sockdiag.listeners(port) if sock.local_address == address]


def drain_flag(target: int) -> Path:
    """drainflag.path, without the imports of the controller's logging it brings."""
    return RUN_DIR / "instances" / f"{target}.drain"


def _retired(group: reuseport.Group) -> set[int]:
    """The instances the group's forwarders carry to that are being retired (drain flag)."""
    return {target for target in group.targets.values() if drain_flag(target).exists()}


def _member_copy(group: reuseport.Group) -> socket.socket | None:
    """A copy of a listener of ``group``, to set its program through; its recorded owner is
    asked first, then every process."""
    wanted = [inode for inode in group.slots if inode not in group.closing] or group.slots
    for inode in wanted:
        pid = group.owners.get(inode)
        with contextlib.suppress(OSError, KeyError):
            if pid:
                return copy_socket(pid, sockdiag.socket_fds(pid)[inode])
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = sockdiag.socket_fds(name)
        except OSError:
            continue
        for inode in fds.keys() & set(wanted):
            with contextlib.suppress(OSError):
                return copy_socket(int(name), fds[inode])
    return None


def steer(group: reuseport.Group, via: socket.socket | None = None, *,
          across_leaves: bool = False) -> str:
    """Attach the program for ``group`` as it is now (through ``via``, a copy of one of its
    listeners, or one found); return what it does (for the journal). ``across_leaves``: one
    that stays right while its closing listeners leave, which their owners close when they
    please (reuseport.Group.program_across_leaves), not under the record's lock as here."""
    retired = _retired(group)
    code = group.program_across_leaves(retired) if across_leaves else group.program(retired)
    copy = via or _member_copy(group)
    if copy is None:
        raise OSError(errno.ESRCH, "no listener of the group found to set its program through")
    try:
        sockdiag.attach_reuseport_program(copy, code)
    finally:
        if via is None:
            copy.close()
    if not group.exact:
        return f"the kernel's hash picks among the {len(group.slots)} listeners " \
               "(which holds which slot is not known)"
    receiving = len(group.weights_across_leaves(retired) if across_leaves
                    else group.weights(retired))
    return f"new connections go to {receiving} of the {len(group.slots)} listeners"


def notify(state: str, fds: list[int] | None = None) -> None:
    """sd_notify(3) ``state`` with ``fds`` to the service manager (NotifyAccess=all)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        raise OSError(errno.ENOTCONN, "no NOTIFY_SOCKET (NotifyAccess=all is needed)")
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendmsg([state.encode()], ancillary)


def notify_barrier(timeout: float = 5.0) -> None:
    """Return once the service manager has handled what was sent before (sd_notify_barrier):
    it looks the sender up by PID, which fails once this short-lived process has exited."""
    read_end, write_end = os.pipe()
    try:
        notify("BARRIER=1", [write_end])
        os.close(write_end)
        write_end = -1
        poller = select.poll()
        poller.register(read_end, 0)  # POLLHUP: the manager closed its copy
        if not poller.poll(timeout * 1000):
            raise OSError(errno.ETIMEDOUT, "the service manager did not answer BARRIER=1")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def store(copies: list[socket.socket]) -> None:
    """Keep ``copies`` (of socat's listeners) in the unit's file descriptor store, in place of
    what it held."""
    notify(f"FDSTOREREMOVE=1\nFDNAME={STORED}")
    notify(f"FDSTORE=1\nFDNAME={STORED}", [copy.fileno() for copy in copies])
    notify_barrier()


def executing_systemd(pid: int) -> bool:
    """Whether process ``pid`` still runs the service manager's code (forked, not yet
    executing the unit's command)."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == os.readlink("/proc/1/exe")
    except PermissionError:  # not the service manager's hook: nothing to tell apart
        return False


def passed_fds(pid: int) -> dict[int, int]:
    """The sockets systemd passed to process ``pid`` from the file descriptor store
    (LISTEN_FDS, from descriptor 3 on): {inode: descriptor}."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = dict(item.partition(b"=")[::2] for item in environ.read().split(b"\0"))
        count = int(variables.get(b"LISTEN_FDS", b"0"))
    except (OSError, ValueError):
        return {}
    found = {}
    for fd in range(3, 3 + count):
        with contextlib.suppress(OSError):
            inode = sockdiag.parse_socket_link(os.readlink(f"/proc/{pid}/fd/{fd}"))
            if inode is not None:
                found[inode] = fd
    return found


def joined(pid: int, port: int, target: int, timeout: float = 10.0) -> str:
    """The forwarder ``pid`` to instance ``target`` has started: once it listens on ``port``,
    record its listener in the group and attach the group's program, which otherwise knows
    nothing of it (the last slot, unused) or, left from a drain, sends it every connection.
    Then close the listeners its dead predecessor left in the file descriptor store, and
    store its own."""
    deadline = time.monotonic() + timeout
    inherited: dict[int, int] | None = None  # read once the process runs socat
    while True:
        try:
            # Type=simple: this may run before systemd's child has become socat, when it
            # holds the stored listener already but not yet socat's environment (LISTEN_FDS).
            if inherited is None and not executing_systemd(pid):
                inherited = passed_fds(pid)
            fds = sockdiag.socket_fds(pid)
        except (FileNotFoundError, ProcessLookupError):
            return "the forwarder has exited"
        mine = [] if inherited is None else sockdiag.held_by(sockdiag.listeners(port),
                                                             fds.keys() - inherited.keys())
        if mine:
            break
        if time.monotonic() >= deadline:
            return f"the forwarder does not listen on port {port} after {timeout:g} s"
        time.sleep(POLL)
    done, copies = [], []
    try:
        for sock in mine:
            copy = copy_socket(pid, fds[sock.inode])
            copies.append(copy)
            with records().port(port) as groups:
                group = groups.setdefault(sock.local_address, reuseport.Group())
                # Its own arrival is known: what else changed unseen came before it. A
                # listener it took over from the store (the built-in proxy) keeps its slot.
                group.reconcile([inode for inode in _present(port, sock.local_address)
                                 if inode != sock.inode or inode in group.slots])
                group.join(sock.inode)
                group.targets[sock.inode], group.owners[sock.inode] = target, pid
                done.append(steer(group, via=copy))
        passed = inherited or {}  # set: socat listens
        for sock in sockdiag.held_by(sockdiag.listeners(port), passed):
            how = close_listener(pid, sock, passed[sock.inode])
            done.append(f"the listener kept through the restart (socket {sock.inode}) {how}")
        if os.environ.get("NOTIFY_SOCKET"):  # the unit keeps it (the proxy does it itself)
            try:
                store(copies)
                done.append("kept in the file descriptor store")
            except OSError as exc:
                done.append(f"not kept in the file descriptor store ({exc.strerror or exc})")
    finally:
        for copy in copies:
            copy.close()
    return "; ".join(done)


def steer_away(pid: int, sock: sockdiag.TcpSocket, fd: int) -> tuple[socket.socket | None, str]:
    """Send new connections to the listeners that should have them rather than to ``sock``,
    ``fd`` of ``pid``, then give the handshakes already begun on it sockdiag.STEER_GRACE to
    complete.

    Returns a copy of the listener (None if it could not be had) and what was done.
    """
    try:
        copy = copy_socket(pid, fd)
    except OSError as exc:
        return None, f"not steered ({exc.strerror})"
    try:
        with records().port(sock.local_port) as groups:
            group = groups.setdefault(sock.local_address, reuseport.Group())
            group.reconcile(_present(sock.local_port, sock.local_address))
            group.closing.add(sock.inode)
            how = steer(group, via=copy)
    except OSError as exc:
        return copy, f"not steered ({exc.strerror})"
    time.sleep(sockdiag.STEER_GRACE)
    return copy, how


def _close(sock: sockdiag.TcpSocket, copy: socket.socket | None) -> str:
    """Close listener ``sock``: destroy it, or else shut it down through ``copy``."""
    try:
        sockdiag.destroy(sock)
        return "destroyed (sock_diag)"
    except OSError as exc:
        destroy_error = exc.strerror or str(exc)
    if copy is None:
        raise OSError(errno.EPERM, f"SOCK_DESTROY: {destroy_error}; no copy of the listener "
                                   "to shut down")
    try:
        copy.shutdown(socket.SHUT_RD)
    except OSError as exc:
        raise OSError(exc.errno, f"SOCK_DESTROY: {destroy_error}; shutdown: {exc.strerror}") from None
    return f"shut down through a copy (SOCK_DESTROY failed: {destroy_error})"


def close_listener(pid: int, sock: sockdiag.TcpSocket, fd: int) -> str:
    """Close one listener of ``pid`` without signalling it; return how (for the journal).

    The group's slots are read just before the close and its program set again right after,
    under the record's lock: the kernel has moved the last listener into the slot this one
    leaves, and the program must follow it."""
    copy, how = steer_away(pid, sock, fd)
    try:
        with records().port(sock.local_port) as groups:
            group = groups.setdefault(sock.local_address, reuseport.Group())
            group.reconcile(_present(sock.local_port, sock.local_address))
            closed = _close(sock, copy)
            group.leave(sock.inode)
            group.reconcile(_present(sock.local_port, sock.local_address))
            after = ""
            if group.slots:
                try:
                    after = f"; {steer(group)}"
                except OSError as exc:
                    after = f"; the program of the listeners left is not set ({exc.strerror})"
        return f"{how}, then {closed}{after}"
    finally:
        if copy is not None:
            copy.close()


def close_listeners(pid: int, done: set[int]) -> None:
    """Close the listeners ``pid`` holds that are not in ``done`` (inodes), and add them there.

    Raises OSError when one cannot be closed from the kernel side.
    """
    try:
        fds = sockdiag.socket_fds(pid)
    except (FileNotFoundError, ProcessLookupError):
        return  # socat has exited
    listening = sockdiag.sockets(1 << sockdiag.TcpState.LISTEN)
    for sock in sockdiag.held_by(listening, fds.keys() - done):
        how = close_listener(pid, sock, fds[sock.inode])
        done.add(sock.inode)
        log(f"listener {sock.local_address}:{sock.local_port} (socket {sock.inode}) {how}")


def drain(main_pid: int, timeout: float) -> int:
    """Close the listener and wait for the connections in flight; return how many were cut.

    The listeners are looked for until socat is gone, not only once: a stop right after the
    start may come before socat listens.
    """
    me = os.getpid()
    group = cgroup.own_cgroup()
    deadline = time.monotonic() + timeout
    closed: set[int] = set()
    signalled = False
    while True:
        others = cgroup.pids(group) - {me}
        if main_pid in others and not signalled:  # in this unit: not a reused PID
            try:
                close_listeners(main_pid, closed)
            except OSError as exc:
                log(f"cannot close socat's listener from the kernel side ({exc.strerror}): "
                    "SIGTERM instead, which resets a connection socat accepted and had not "
                    "yet handed to a child")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(main_pid, signal.SIGTERM)
                signalled = True
        if not others or time.monotonic() >= deadline:
            return len(others)
        time.sleep(POLL)


def main(argv: list[str]) -> int:
    usage = ("usage: python3 -m bluegreen.forwarders.hook drain MAINPID TIMEOUT\n"
             "       python3 -m bluegreen.forwarders.hook joined MAINPID PUBLIC_PORT TARGET_PORT")
    try:
        if len(argv) == 3 and argv[0] == "drain":
            main_pid, number = int(argv[1]), float(argv[2])
        elif len(argv) == 4 and argv[0] == "joined":
            main_pid, public_port, target = int(argv[1]), int(argv[2]), int(argv[3])
        else:
            raise ValueError(argv)
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "joined":
        try:
            log(f"listening on port {public_port}: {joined(main_pid, public_port, target)}")
        except OSError as exc:  # the forwarder serves all the same, steered or not
            log(f"the listeners of port {public_port} are not steered ({exc.strerror or exc})")
        return 0
    started = time.monotonic()
    left = drain(main_pid, number)
    took = time.monotonic() - started
    if left:
        log(f"drain: {left} connection processes still open after {took:.2f} s; systemd stops them")
    else:
        log(f"drained in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
