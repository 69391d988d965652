"""The SO_REUSEPORT group of the public port: which listener sits in which slot, and the
classic BPF program that gives new connections to the listeners that should have them.

Every forwarder listens on the public port in one SO_REUSEPORT group (one per port and
address). The kernel keeps the group's listeners in an array: a listener that joins takes the
next slot, and when one leaves, the LAST one moves into its slot (reuseport_detach_sock). A
program attached with SO_ATTACH_REUSEPORT_CBPF returns a slot index for each new connection; an
index past the end makes the kernel pick by its own hash, as it does without a program. The
program belongs to the group: any member's descriptor sets it, and it stays until replaced or
until the group is empty.

The kernel does not say which listener holds which slot, so the group is followed here from the
moves it makes (``join``, ``leave``) and kept in a small record next to the forwarders' settings
(``Records``), which every process that changes the group updates under a lock. What the record
cannot have seen (a forwarder that crashed, one started before the record existed) is made up
from the kernel's list of listeners (``reconcile``): one unseen departure or one unseen arrival
is still exact; more and the slots are no longer known, and the group falls back to the
kernel's hash until it empties.

``program`` is the whole policy: from the slots and a weight for each listener that should
receive (equal weights: hash across them; unequal: a share each, as a canary needs), one
program. After every change of membership, and when a listener starts closing, it is computed
again and attached.

A TCP forwarder joins the group once its instance is healthy, and receives at once. The
instances' own listeners (forwarder = "direct", forwarders/direct.py) join when their instance
starts, before it is proven healthy: their group ``admits`` only the instances the switch
named, and its program then names their slots even when they are all the group has, so that
a listener that joins later (the last slot) gets nothing until a switch admits it.

A forwarder's hook closes its listener itself, under the record's lock, and sets the program
again at once. An instance's gunicorn closes its own when it stops, with no hook in between:
while a listener of a direct group is closing, its program is ``program_across_leaves``, which
names no slot the kernel's move could change.

Runs in the forwarder units, in their hooks (forwarders/hook.py: ``ExecStartPost=``,
``ExecStop=``; forwarders/direct.py), never attaching a program from the controller, which
only writes what the direct group admits; kept free of heavy imports, as the hooks run at
every start and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import struct
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Classic BPF opcodes (linux/filter.h), the ancillary load of the packet's flow hash and the
# base of loads relative to its network header.
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_ALU_AND_K = 0x54
_ALU_MUL_K = 0x24
_ALU_RSH_K = 0x74
_ALU_MOD_K = 0x94
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_JMP_JGE_K = 0x35
_RET_K = 0x06
_RET_A = 0x16
_SKF_AD_RXHASH = -0x1000 + 32
_SKF_NET_OFF = -0x100000
_GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash: the high bits mix every bit of the key
_BY_KERNEL_HASH = 0xFFFFFFFF  # an index no group has
# A classic BPF program has at most BPF_MAXINSNS (4096) instructions: two per listener here.
MAX_RECEIVERS = 2000


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _connection_hash(flow_hash: bool = True) -> list[bytes]:
    """Load a number that is the same for a connection's SYNs and spread over connections: the
    packet's flow hash (skb->hash), or, when it has none (0: a NIC that computes none and no
    RPS, as virtio-net without hash reports), the client's TCP port; then mixed, so that
    the ports a client takes in steps of two still spread over any total. Without
    ``flow_hash``, the port alone (to test that path on a host whose packets have a hash).

    The port is read after an IPv4 header without options (a SYN carries none in practice)
    or after the IPv6 header; a load that fails ends the program with 0, the first slot."""
    load_port = [
        _insn(_LD_B_ABS, _SKF_NET_OFF),  # the IP version, in the high four bits
        _insn(_ALU_AND_K, 0xF0),
        _insn(_JMP_JEQ_K, 0x60, jt=2),
        _insn(_LD_H_ABS, _SKF_NET_OFF + 20),
        _insn(_JMP_JA, 1),
        _insn(_LD_H_ABS, _SKF_NET_OFF + 40),
    ]
    mix = [_insn(_ALU_MUL_K, _GOLDEN), _insn(_ALU_RSH_K, 16)]
    if not flow_hash:
        return load_port + mix
    return [_insn(_LD_W_ABS, _SKF_AD_RXHASH),
            _insn(_JMP_JEQ_K, 0, jf=len(load_port)), *load_port, *mix]


def program(slots: Sequence[int], weights: Mapping[int, int], *, closed: bool = False,
            flow_hash: bool = True) -> bytes:
    """The cBPF program that gives new connections to the listeners of ``slots`` (slot order)
    with a positive weight, each in proportion to it.

    No such listener: the kernel's hash over the whole group (as with no program). All of them,
    equal weights: the same, unless the group is ``closed`` to listeners that join after it
    (they would share the kernel's hash). One: every connection to its slot. Several: a hash of
    the connection (see _connection_hash) modulo the total weight picks one: with weights
    that add up to 1000, a listener takes its weight in thousandths.
    """
    receiving = [(slot, weights[member]) for slot, member in enumerate(slots)
                 if weights.get(member, 0) > 0]
    if len(receiving) > MAX_RECEIVERS:
        raise ValueError(f"{len(receiving)} listeners are more than one program can pick from")
    everybody = len(receiving) == len(slots) and len({w for _, w in receiving}) == 1
    if not receiving or (everybody and not closed):
        return _insn(_RET_K, _BY_KERNEL_HASH)
    if len(receiving) == 1:
        return _insn(_RET_K, receiving[0][0])
    total = sum(weight for _, weight in receiving)
    code = [*_connection_hash(flow_hash), _insn(_ALU_MOD_K, total)]
    bound = 0
    for slot, weight in receiving[:-1]:
        bound += weight
        code += [_insn(_JMP_JGE_K, bound, jt=1), _insn(_RET_K, slot)]  # below bound: this one
    code.append(_insn(_RET_K, receiving[-1][0]))
    return b"".join(code)


def instructions(code: bytes) -> int:
    return len(code) // 8


@dataclass
class Group:
    """The listeners of one SO_REUSEPORT group (by inode), in the slots the kernel has them.

    ``targets``: the instance port each forwarder carries to (known from its start hook);
    ``owners``: the process that holds each listener; ``closing``: listeners on their way out.
    ``exact`` is False once the slots can no longer be known (see reconcile). ``admitted``:
    the instances whose listeners may receive (the direct group's), None for every one.
    ``shares``: during a canary, each receiving instance's weight (canary.py's split of the
    new connections between the two releases); empty: equal weights."""

    slots: list[int] = field(default_factory=list)
    targets: dict[int, int] = field(default_factory=dict)
    owners: dict[int, int] = field(default_factory=dict)
    closing: set[int] = field(default_factory=set)
    exact: bool = True
    admitted: set[int] | None = None
    shares: dict[int, int] = field(default_factory=dict)

    def join(self, inode: int) -> None:
        if inode not in self.slots:
            self.slots.append(inode)

    def leave(self, inode: int) -> None:
        """The kernel's move: the last listener takes the slot of the one that leaves."""
        if inode not in self.slots:
            return
        index = self.slots.index(inode)
        last = self.slots.pop()
        if index < len(self.slots):
            self.slots[index] = last
        for known in (self.targets, self.owners):
            known.pop(inode, None)
        self.closing.discard(inode)

    def reconcile(self, present: Collection[int]) -> None:
        """Bring the slots in line with the listeners the kernel lists now (``present``).

        Departures and arrivals not seen here are applied as the kernel did them: exact for
        one of each (an unseen departure before an unseen arrival, as when systemd restarts a
        forwarder that died). With more, their order is unknown, and so are the slots. An empty
        group starts afresh: the kernel frees it with its program.
        """
        if not present:
            self.slots, self.targets, self.owners = [], {}, {}
            self.closing, self.exact = set(), True
            return  # what it admits stays: the instances the switch named still serve
        gone = [inode for inode in self.slots if inode not in present]
        new = [inode for inode in present if inode not in self.slots]
        if len(gone) > 1 or len(new) > 1:
            self.exact = False
        for inode in gone:
            self.leave(inode)
        for inode in new:
            self.join(inode)

    def weights(self, retired: Collection[int] = ()) -> dict[int, int]:
        """Who should receive: not a closing listener, nor one to a ``retired`` instance (one
        whose release is draining), nor one the group does not admit; if that leaves nobody,
        any listener not closing (not so in a group that admits: nobody)."""
        open_ = [inode for inode in self.slots if inode not in self.closing]
        if self.admitted is not None:
            return self._weighted(inode for inode in open_
                                  if self.targets.get(inode) in self.admitted)
        wanted = [inode for inode in open_ if self.targets.get(inode) not in retired]
        return self._weighted(wanted) or self._weighted(open_) or dict.fromkeys(open_, 1)

    def _weighted(self, inodes: Iterable[int]) -> dict[int, int]:
        """``inodes`` with their instance's share (1 each without shares), those at 0 left out."""
        if not self.shares:
            return dict.fromkeys(inodes, 1)
        weighted = {inode: self.shares.get(self.targets.get(inode, -1), 1) for inode in inodes}
        return {inode: weight for inode, weight in weighted.items() if weight > 0}

    def program(self, retired: Collection[int] = ()) -> bytes:
        if not self.exact:
            return _insn(_RET_K, _BY_KERNEL_HASH)
        return program(self.slots, self.weights(retired), closed=self.admitted is not None)

    def weights_across_leaves(self, retired: Collection[int] = ()) -> dict[int, int]:
        """``weights``, less the listeners a departure could move: closing listeners may leave
        at any moment (an instance's gunicorn closes its own when it stops), each time moving
        the group's last listener into the slot it leaves, and a program that named that last
        slot would then name a slot past the end (the kernel's hash over every listener, those
        that should receive nothing included) or another listener. With c closing listeners
        only the last c slots can move: their listeners get nothing until the next program,
        unless nobody else would receive."""
        weights = self.weights(retired)
        leaving = sum(1 for inode in self.slots if inode in self.closing)
        movable = set(self.slots[len(self.slots) - leaving:]) if leaving else set()
        steady = {inode: weight for inode, weight in weights.items() if inode not in movable}
        return steady or weights

    def program_across_leaves(self, retired: Collection[int] = ()) -> bytes:
        """``program``, right before and after the closing listeners leave (see
        weights_across_leaves)."""
        if not self.exact:
            return _insn(_RET_K, _BY_KERNEL_HASH)
        return program(self.slots, self.weights_across_leaves(retired),
                       closed=self.admitted is not None)

    def to_json(self) -> dict[str, object]:
        return {"slots": self.slots, "targets": {str(k): v for k, v in self.targets.items()},
                "owners": {str(k): v for k, v in self.owners.items()},
                "closing": sorted(self.closing), "exact": self.exact,
                **({} if self.admitted is None else {"admitted": sorted(self.admitted)}),
                **({"shares": {str(k): v for k, v in self.shares.items()}} if self.shares else {})}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Group:
        def table(name: str) -> dict[int, int]:
            raw = data.get(name) or {}
            assert isinstance(raw, dict)
            return {int(k): int(v) for k, v in raw.items()}

        slots = data.get("slots") or []
        closing = data.get("closing") or []
        admitted = data.get("admitted")
        assert isinstance(slots, list) and isinstance(closing, list)
        assert admitted is None or isinstance(admitted, list)
        return cls([int(i) for i in slots], table("targets"), table("owners"),
                   {int(i) for i in closing}, bool(data.get("exact", True)),
                   None if admitted is None else {int(i) for i in admitted}, table("shares"))


class Records:
    """The groups of the public ports, one file per port (each group by its address), read and
    written under an exclusive lock: the hooks of several forwarders run at once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextlib.contextmanager
    def port(self, port: int) -> Iterator[dict[str, Group]]:
        """The groups of ``port`` by address, written back when the block ends without error."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{port}.json"
        with open(path, "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            try:
                raw = json.loads(handle.read() or "{}")
                groups = {address: Group.from_json(data) for address, data in raw.items()}
            except (ValueError, AssertionError, AttributeError, TypeError):
                # Unreadable: what it said is lost, so nothing is known of the slots.
                groups = {}
            yield groups
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({address: group.to_json()
                                     for address, group in groups.items() if group.slots}))

    def share(self, port: int, shares: Mapping[int, int]) -> None:
        """Weigh the instances of ``port``'s groups by ``shares`` (a canary's), or equally
        (empty); the program follows at the next steer."""
        with self.port(port) as groups:
            for group in groups.values():
                group.shares = dict(shares)
