"""The stop hook of bluegreen-forward@.service (ExecStop=+: root, in the forwarder's cgroup).

``drain MAINPID TIMEOUT``
    Close socat's listening socket from the kernel side, then return once every other process
    of the unit (socat's per-connection children) has finished, or after TIMEOUT seconds;
    systemd then stops whatever is left.

socat accepts a connection and only then forks the child that serves it. A signal to socat
between the two would kill the only holder of that connection and reset its client, so the
listener is closed without touching socat: a sock_diag SOCK_DESTROY of that one socket (what
``ss -K`` does; CAP_NET_ADMIN). The kernel moves the connections still queued on it to the
new forwarder's listener (net.ipv4.tcp_migrate_req=1); socat forks for the connection it holds,
if any, and its next accept() fails with EINVAL, on which it exits 1 by itself.

Only the listeners socat's main process holds are closed, found by their inodes in
/proc/MAINPID/fd: the new forwarder listens on the same port (SO_REUSEPORT). Before that, new
connections are steered to the new listener through a copy of socat's descriptor (pidfd_getfd
and a one-instruction reuseport BPF program, see sockdiag.prefer_last_joined): a listener
closed while the kernel completes a handshake on it can lose that connection, and a moment
later it has none left. Without SOCK_DESTROY (a kernel without CONFIG_INET_DIAG_DESTROY) the
listener is shut down through that copy (shutdown(SHUT_RD)), which closes it the same way.
Only if both fail does socat get a SIGTERM, as before, and the journal says so.
The steering program stays with the port's listeners: when several are left (a forwarder per
instance, app.instances > 1), a copy of one of theirs makes the kernel spread new connections
among them by its hash again.

Kept free of heavy imports: it starts on every switch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import time

from bluegreen import cgroup, sockdiag

POLL = 0.02
SYS_PIDFD_GETFD = 438  # the same number on x86-64, arm64 and the other asm-generic ABIs


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


def steer_away(pid: int, sock: sockdiag.TcpSocket, fd: int) -> tuple[socket.socket | None, str]:
    """Send new connections to the newest forwarder's listener rather than to ``sock``, ``fd``
    of ``pid``, then give the handshakes already begun on it sockdiag.STEER_GRACE to complete.

    Returns a copy of the listener (None if it could not be had) and what was done.
    """
    try:
        copy = copy_socket(pid, fd)
    except OSError as exc:
        return None, f"not steered ({exc.strerror})"
    group = [other for other in sockdiag.listeners(sock.local_port)
             if (other.family, other.local_address, other.uid) == (sock.family, sock.local_address, sock.uid)]
    try:
        sockdiag.prefer_last_joined(copy, len(group))
    except OSError as exc:
        return copy, f"not steered ({exc.strerror})"
    time.sleep(sockdiag.STEER_GRACE)
    return copy, "new connections steered to the new listener"


def close_listener(pid: int, sock: sockdiag.TcpSocket, fd: int) -> str:
    """Close one listener of ``pid`` without signalling it; return how (for the journal)."""
    copy, how = steer_away(pid, sock, fd)
    try:
        try:
            sockdiag.destroy(sock)
            return f"{how}, then destroyed (sock_diag)"
        except OSError as exc:
            destroy_error = exc.strerror or str(exc)
        if copy is None:
            raise OSError(errno.EPERM, f"SOCK_DESTROY: {destroy_error}; no copy of the listener "
                                       "to shut down")
        try:
            copy.shutdown(socket.SHUT_RD)
        except OSError as exc:
            raise OSError(exc.errno, f"SOCK_DESTROY: {destroy_error}; shutdown: {exc.strerror}") from None
        return f"{how}, then shut down through a copy (SOCK_DESTROY failed: {destroy_error})"
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
        spread_again(sock.local_port, pid)


def spread_again(port: int, closed_by: int) -> None:
    """With several listeners left on ``port``, undo the steering: they share new connections
    by the kernel's hash again. Any one of them will do (the program belongs to the group)."""
    left = {sock.inode for sock in sockdiag.listeners(port)}
    if len(left) < 2:
        return  # with one, the kernel already falls back to its hash
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == closed_by:
            continue
        try:
            fds = sockdiag.socket_fds(name)
        except OSError:
            continue
        for inode in fds.keys() & left:
            try:
                copy = copy_socket(int(name), fds[inode])
            except OSError:
                continue
            try:
                sockdiag.spread_by_hash(copy)
            except OSError as exc:
                log(f"the listeners left on port {port} stay steered ({exc.strerror})")
            finally:
                copy.close()
            log(f"the {len(left)} listeners left on port {port} share new connections again")
            return


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
        log(f"drain: {left} connection processes still open after {took:.2f} s; systemd stops them")
    else:
        log(f"drained in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
