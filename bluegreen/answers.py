"""What an instance answered: responses by status class, and how long they took.

Every worker process of an instance counts in a file of its own,
``/run/bluegreen-app/PORT/answers.PID`` (the instance unit's ``RuntimeDirectory=``, which
systemd removes when the instance stops): a fixed array of 64-bit counters, memory-mapped, so
that counting a response is a few memory writes under the process's lock, never a system
call. gunicornconf.py's hooks count for WSGI apps, asgidrain.py for ASGI ones; a request that
ends in an exception counts as a 5xx, the 500 gunicorn or uvicorn answers it with.

The controller sums the files of an instance (``read``): for /metrics, with each instance's
release, and to compare a canary's answers with the old release's. bluegreen's own health
checks are not counted. Counting never fails a request: without a writable directory nothing
is counted.

Kept free of bluegreen's other modules: it is imported by every worker of every instance.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

# The User-Agent of bluegreen's own health checks (health.py), whose answers are not counted:
# they would dilute a canary's error rate with requests no client made.
HEALTH_AGENT = "bluegreen-health"
ROOT = Path("/run/bluegreen-app")  # RuntimeDirectory=bluegreen-app/%i of the instance unit
PREFIX = "answers."
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Upper bounds of the latency histogram, in seconds (Prometheus's defaults).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The file: a version, the classes, the buckets, then the count and the sum in microseconds.
VERSION = 1
_FIELDS = 1 + len(CLASSES) + len(BUCKETS) + 2
_FORMAT = f"={_FIELDS}Q"
SIZE = struct.calcsize(_FORMAT)
_CLASS_AT, _BUCKET_AT = 1, 1 + len(CLASSES)
_COUNT_AT, _SUM_AT = _BUCKET_AT + len(BUCKETS), _BUCKET_AT + len(BUCKETS) + 1


def status_class(status: int | None) -> int:
    """The index in CLASSES of a status; no status (the request failed) is a 5xx."""
    if status is None or not 100 <= status <= 599:
        return 4
    return status // 100 - 1


class Counter:
    """The counters of this process, in its file."""

    def __init__(self, directory: Path) -> None:
        # A worker whose pid an earlier one had goes on counting in its file: the sum holds.
        self.path = directory / f"{PREFIX}{os.getpid()}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # Readable by the controller, which reads without CAP_DAC_OVERRIDE, whatever the
            # instance's umask (0077) made of the mode.
            os.fchmod(fd, 0o644)
            os.ftruncate(fd, SIZE)
            self.map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        struct.pack_into("=Q", self.map, 0, VERSION)
        self.lock = threading.Lock()  # gthread workers answer from several threads

    def record(self, status: int | None, seconds: float) -> None:
        offsets = [_CLASS_AT + status_class(status), _COUNT_AT]
        offsets += [_BUCKET_AT + i for i, bound in enumerate(BUCKETS) if seconds <= bound]
        micros = max(0, int(seconds * 1_000_000))
        with self.lock:
            for index in offsets:
                self._add(index, 1)
            self._add(_SUM_AT, micros)

    def _add(self, index: int, value: int) -> None:
        (old,) = struct.unpack_from("=Q", self.map, index * 8)
        struct.pack_into("=Q", self.map, index * 8, (old + value) & 0xFFFFFFFFFFFFFFFF)


_mine: dict[int, Counter | None] = {}  # by pid: a forked worker counts in a file of its own


def counter() -> Counter | None:
    """This process's counter; None when the instance has no directory to count in."""
    pid = os.getpid()
    if pid not in _mine:
        directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        try:
            _mine[pid] = Counter(Path(directory)) if directory else None
        except OSError:
            _mine[pid] = None
    return _mine[pid]


def record(status: int | None, seconds: float) -> None:
    """Count one answer of this process (nothing if it cannot count)."""
    mine = counter()
    if mine is not None:
        mine.record(status, seconds)


@dataclass
class Answers:
    """The sum of an instance's (or a release's) counters."""

    classes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    seconds: float = 0.0

    def __add__(self, other: Answers) -> Answers:
        return Answers({name: self.classes[name] + other.classes[name] for name in CLASSES},
                       [a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
                       self.count + other.count, self.seconds + other.seconds)

    @property
    def errors(self) -> int:
        """Answers that were server errors (5xx), failed requests included."""
        return self.classes["5xx"]

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0


def directory(port: int, root: Path = ROOT) -> Path:
    return root / str(port)


def read(port: int, root: Path = ROOT) -> Answers:
    """What the instance on ``port`` answered since it started (nothing if it is gone)."""
    total = Answers()
    try:
        files = sorted(directory(port, root).glob(f"{PREFIX}*"))
    except OSError:
        return total
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) != SIZE:
            continue
        values = struct.unpack(_FORMAT, data)
        if values[0] != VERSION:
            continue
        total = total + Answers(dict(zip(CLASSES, values[_CLASS_AT:_BUCKET_AT], strict=True)),
                                list(values[_BUCKET_AT:_COUNT_AT]), values[_COUNT_AT],
                                values[_SUM_AT] / 1_000_000)
    return total
