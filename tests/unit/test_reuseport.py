"""Steering new connections among the forwarders of the public port (one per instance): the
slots of the SO_REUSEPORT group as the kernel keeps them, and the program attached at each
change, checked on real listeners."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bluegreen import drainflag, sockdiag
from bluegreen.forwarders import hook, reuseport
from bluegreen.forwarders.reuseport import Group
from tests.unit.test_sockdiag import needs_net_admin

# A stand-in for a forwarder: listens (SO_REUSEPORT) on the port given (0: a new one), says
# which, and accepts nothing, so that what reaches it stays in its queue to be counted.
LISTENER = """\
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen(1024)
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
"""


class Forwarder:
    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LISTENER, str(port)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        (self.inode,) = sockdiag.socket_fds(self.process.pid).keys() & {
            sock.inode for sock in sockdiag.listeners(self.port)}

    @property
    def pid(self) -> int:
        return self.process.pid

    def queued(self) -> int:
        return sum(s.rx_queue for s in sockdiag.listeners(self.port) if s.inode == self.inode)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(hook, "RUN_DIR", tmp_path, raising=False)
    monkeypatch.setattr(sockdiag, "STEER_GRACE", 0.01)
    return tmp_path


@pytest.fixture
def forwarders() -> Iterator[Callable[[int], Forwarder]]:
    """Start forwarders in turn, the first on a new port, the others on the same one; each is
    recorded by its start hook (ExecStartPost) as the unit does, carrying to the target given."""
    started: list[Forwarder] = []

    def start(target: int) -> Forwarder:
        forwarder = Forwarder(started[0].port if started else 0)
        started.append(forwarder)
        hook.joined(forwarder.pid, forwarder.port, target)
        return forwarder

    yield start
    for forwarder in started:
        forwarder.stop()


def spread(port: int, among: list[Forwarder], count: int = 60) -> list[int]:
    """Connect ``count`` new clients; return how many each of ``among`` got."""
    before = [forwarder.queued() for forwarder in among]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        deadline = time.monotonic() + 5
        while True:
            got = [forwarder.queued() - b for forwarder, b in zip(among, before, strict=True)]
            if sum(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.01)
    finally:
        for client in clients:
            client.close()


def drain(forwarder: Forwarder) -> None:
    """The forwarder's stop hook closes its listener (steered away first)."""
    hook.close_listeners(forwarder.pid, set())


def test_a_forwarder_started_again_after_a_take_out_shares_new_connections(
        forwarders: Callable[[int], Forwarder]) -> None:
    needs_net_admin()
    first, second = forwarders(8001), forwarders(8002)
    drain(second)  # its instance died: taken out
    again = forwarders(8002)  # healthy again: put back
    got = spread(first.port, [first, again])
    assert sum(got) == 60 and min(got) > 0, got


def test_the_drain_of_the_listener_in_the_last_slot_steers_to_the_other(
        forwarders: Callable[[int], Forwarder]) -> None:
    first, second = forwarders(8001), forwarders(8002)
    copy, _how = hook.steer_away(second.pid, *_listener(second))
    assert copy is not None
    copy.close()
    assert spread(first.port, [first, second]) == [60, 0]


def test_lowering_instances_from_two_to_one_never_steers_to_a_closing_listener(
        forwarders: Callable[[int], Forwarder], run_dir: Path) -> None:
    needs_net_admin()
    old1, old2, new = forwarders(8001), forwarders(8002), forwarders(8003)
    for target in (8001, 8002):  # the old release drains
        drainflag.put(run_dir, target)
    drain(old1)
    assert spread(new.port, [old2, new]) == [0, 60]
    copy, _how = hook.steer_away(old2.pid, *_listener(old2))
    assert copy is not None
    copy.close()
    assert spread(new.port, [old2, new]) == [0, 60]


def test_while_the_old_forwarders_drain_one_by_one_only_the_new_ones_get_connections(
        forwarders: Callable[[int], Forwarder], run_dir: Path) -> None:
    needs_net_admin()
    old1, old2, new1, new2 = (forwarders(target) for target in (8001, 8002, 8003, 8004))
    for target in (8001, 8002):
        drainflag.put(run_dir, target)
    drain(old1)  # old2 waits for its turn, as long as old1's connections take
    old2_got, *new_got = spread(new1.port, [old2, new1, new2])
    assert old2_got == 0 and min(new_got) > 0, (old2_got, new_got)
    drain(old2)
    got = spread(new1.port, [new1, new2])
    assert sum(got) == 60 and min(got) > 0, got


def test_a_canary_gets_its_share(forwarders: Callable[[int], Forwarder]) -> None:
    stable, canary = forwarders(8001), forwarders(8002)
    code = reuseport.program([stable.inode, canary.inode], {stable.inode: 75, canary.inode: 25})
    with hook.copy_socket(stable.pid, _listener(stable)[1]) as copy:
        sockdiag.attach_reuseport_program(copy, code)
    got = spread(stable.port, [stable, canary], count=200)
    assert sum(got) == 200 and 20 <= got[1] <= 80, got


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_without_a_flow_hash_the_clients_port_spreads_a_canary(host: str) -> None:
    """Packets from a NIC that computes no hash (skb->hash 0) are spread by the client's port:
    the program's other path, taken here for every packet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listeners: list[socket.socket] = []
    for _ in range(2):
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, listeners[0].getsockname()[1] if listeners else 0))
        sock.listen(1024)
        listeners.append(sock)
    port = listeners[0].getsockname()[1]
    try:
        code = reuseport.program([1, 2], {1: 750, 2: 250}, flow_hash=False)
        sockdiag.attach_reuseport_program(listeners[0], code)
        clients = [socket.create_connection((host, port)) for _ in range(400)]
        got = []
        for sock in listeners:
            sock.setblocking(False)
            accepted = 0
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                accepted += 1
            got.append(accepted)
        for client in clients:
            client.close()
    finally:
        for sock in listeners:
            sock.close()
    assert sum(got) == 400 and 60 <= got[1] <= 140, got  # 25 % of 400: 100


def test_a_canary_group_weighs_each_instance_by_its_share() -> None:
    group = Group([1, 2, 3], targets={1: 8001, 2: 8002, 3: 8003}, shares={8001: 750, 8002: 250})
    assert group.weights() == {1: 750, 2: 250, 3: 1}
    assert group.weights(retired={8002}) == {1: 750, 3: 1}
    group.shares = {8001: 0, 8002: 1000}  # an aborted canary's, or a promoted one's
    assert group.weights() == {2: 1000, 3: 1}
    direct = Group([1, 2], targets={1: 8001, 2: 8002}, admitted={8001, 8002},
                   shares={8001: 750, 8002: 250})
    assert direct.weights() == {1: 750, 2: 250}
    assert Group.from_json(direct.to_json()) == direct


def _listener(forwarder: Forwarder) -> tuple[sockdiag.TcpSocket, int]:
    fds = sockdiag.socket_fds(forwarder.pid)
    (sock,) = sockdiag.held_by(sockdiag.listeners(forwarder.port), [forwarder.inode])
    return sock, fds[sock.inode]


def test_a_forwarder_that_listened_before_the_record_is_learnt_at_the_next_start() -> None:
    """As after an upgrade: the old forwarder's listener was never recorded. The new one's
    start hook learns it, and knows its own arrival came after."""
    old = Forwarder(0)
    new = Forwarder(old.port)
    try:
        hook.joined(new.pid, new.port, 8002)
        with hook.records().port(old.port) as groups:
            group = groups["127.0.0.1"]
            assert (group.slots, group.exact) == ([old.inode, new.inode], True)
    finally:
        old.stop()
        new.stop()


def test_the_hook_reads_the_drain_flags_the_controller_writes(run_dir: Path) -> None:
    assert hook.drain_flag(8001) == drainflag.path(run_dir, 8001)


def test_a_listener_that_leaves_is_replaced_by_the_last() -> None:
    group = Group([1, 2, 3, 4])
    group.leave(2)
    assert group.slots == [1, 4, 3]
    group.leave(3)  # the last one: nothing moves
    assert group.slots == [1, 4]
    group.join(5)
    assert group.slots == [1, 4, 5]


def test_reconcile_applies_one_unseen_departure_and_one_arrival_exactly() -> None:
    group = Group([1, 2, 3], targets={2: 8002})
    group.reconcile({1, 3, 4})  # 2 died, systemd started 4 in its place
    assert (group.slots, group.targets, group.exact) == ([1, 3, 4], {}, True)
    group.reconcile({1, 3, 4, 5, 6})  # two unseen arrivals: in which order is not known
    assert (len(group.slots), group.exact) == (5, False)
    assert group.program() == reuseport.program([], {})  # the kernel's hash
    group.reconcile(set())  # the group is gone: a new one starts from nothing
    assert group == Group()


def test_who_receives() -> None:
    group = Group([1, 2, 3, 4], targets={1: 8001, 2: 8002, 3: 8003, 4: 8004}, closing={3})
    assert group.weights(retired={8001}) == {2: 1, 4: 1}
    assert group.weights(retired={8002, 8004}) == {1: 1}
    group.closing = {1, 2, 3, 4}
    assert group.weights() == {}


def test_the_program_for_each_shape() -> None:
    by_hash = reuseport.program([], {})
    assert reuseport.instructions(by_hash) == 1
    assert reuseport.program([7, 8], {7: 1, 8: 1}) == by_hash  # everybody, evenly
    assert reuseport.program([7, 8, 9], {9: 1, 8: 0}) == bytes.fromhex("0600000002000000")  # ret #2
    several = reuseport.program([7, 8, 9], {7: 1, 9: 1})
    # The connection's hash (10: the flow hash, else the client's port, mixed); mod #2;
    # jge #1; ret #0; ret #2
    assert reuseport.instructions(several) == 14
    with pytest.raises(ValueError):
        reuseport.program(list(range(3000)), dict.fromkeys(range(1, 3000), 1))


def test_records_round_trip_under_a_lock(tmp_path: Path) -> None:
    records = reuseport.Records(tmp_path)
    with records.port(5000) as groups:
        groups["::"] = Group([1, 2], targets={1: 8001}, owners={1: 42}, closing={2}, exact=False)
        groups["127.0.0.1"] = Group()  # empty: not kept
    with records.port(5000) as groups:
        assert groups == {"::": Group([1, 2], {1: 8001}, {1: 42}, {2}, False)}
    (tmp_path / "5000.json").write_text("{not json")
    with records.port(5000) as groups:
        assert groups == {}


def test_a_group_that_admits_names_its_receivers_even_when_they_are_all_it_has() -> None:
    group = Group([1, 2], targets={1: 8001, 2: 8002}, admitted={8001, 8002})
    assert group.weights() == {1: 1, 2: 1}
    code = group.program()
    assert code != reuseport.program([], {})  # not the kernel's hash: a newcomer would share it
    assert reuseport.instructions(code) == 14
    group.admitted = {8002}
    assert group.program() == bytes.fromhex("0600000001000000")  # ret #1
    group.admitted = set()
    assert group.weights() == {}


def test_receivers_a_departure_could_move_get_nothing_while_listeners_close() -> None:
    targets = {1: 8001, 2: 8002, 3: 8003, 4: 8004}
    group = Group([1, 2, 3, 4], targets=targets, admitted={8003, 8004}, closing={1})
    assert group.weights_across_leaves() == {3: 1}  # 4, the last, would move into slot 0
    after = Group([4, 2, 3], targets=targets, admitted={8003, 8004}, closing=set())
    assert group.program_across_leaves() == bytes.fromhex("0600000002000000")  # ret #2: 3, both ways
    assert after.slots[2] == 3
    group.closing = {1, 2}  # two may leave, in either order: slots 2 and 3 may both move
    group.admitted = {8002, 8003, 8004}
    assert group.weights_across_leaves() == {3: 1, 4: 1}  # nobody steady: as before the move
    group = Group([1, 2, 3], targets={1: 8001, 2: 8002, 3: 8003}, admitted={8002, 8003})
    assert group.weights_across_leaves() == group.weights()  # nothing closing: nothing moves
    assert group.program_across_leaves() == group.program()


def test_listeners_that_join_a_group_that_admits_get_nothing_until_admitted(
        forwarders: Callable[[int], Forwarder]) -> None:
    old_a, old_b = forwarders(8001), forwarders(8002)
    with hook.records().port(old_a.port) as groups:
        (group,) = groups.values()
        group.admitted = {8001, 8002}
        hook.steer(group)
    newcomer = forwarders(8003)  # joins, as an instance's listener does before its health check
    got = spread(old_a.port, [old_a, old_b, newcomer])
    assert got[2] == 0 and got[0] > 0 and got[1] > 0, got
    with hook.records().port(old_a.port) as groups:
        (group,) = groups.values()
        group.admitted = {8003}
        hook.steer(group)
    assert spread(old_a.port, [old_a, old_b, newcomer]) == [0, 0, 60]


def test_records_keep_what_a_group_admits(tmp_path: Path) -> None:
    records = reuseport.Records(tmp_path)
    with records.port(5000) as groups:
        groups["::"] = Group([1], targets={1: 8001}, admitted={8001})
    with records.port(5000) as groups:
        assert groups["::"].admitted == {8001}
