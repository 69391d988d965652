#!/usr/bin/python3
"""HTTP load that counts every request, for the zero-downtime tests and the demo.

Runs until SIGINT/SIGTERM, then prints a JSON report on stdout:
  - ``fast`` threads send GET / one after another, each on a new connection;
  - ``slow`` threads send GET /slow?seconds=S back to back, staggered so that one is always
    in flight;
  - every failure is classified (refused, reset, closed, timeout, http-NNN, other).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

stop = threading.Event()


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    return f"other:{type(exc).__name__}"


def request(host: str, port: int, path: str, timeout: float) -> tuple[bool, str, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if 200 <= response.status < 300:
            return True, "ok", body
        return False, f"http-{response.status}", body
    except (OSError, http.client.HTTPException) as exc:
        return False, classify(exc), b""
    finally:
        connection.close()


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fast: list[tuple[float, float, str, str]] = []
        self.instances: Counter[str] = Counter()
        self.slow: list[tuple[float, float, str]] = []

    def add_fast(self, start: float, end: float, outcome: str, version: str,
                 instance: str = "") -> None:
        with self.lock:
            self.fast.append((start, end, outcome, version))
            if instance and outcome == "ok":
                self.instances[f"{version}@{instance}"] += 1

    def add_slow(self, start: float, end: float, outcome: str) -> None:
        with self.lock:
            self.slow.append((start, end, outcome))


def fast_worker(args: argparse.Namespace, recorder: Recorder) -> None:
    while not stop.is_set():
        start = time.time()
        ok, outcome, body = request(args.host, args.port, "/", args.timeout)
        version = instance = ""
        try:  # an error page may say which release answered too
            answer = json.loads(body) if body else {}
            version, instance = str(answer.get("version", "")), str(answer.get("instance", ""))
        except (ValueError, AttributeError):
            if ok:
                outcome = "bad-body"
        recorder.add_fast(start, time.time(), outcome, version, instance)
        if not ok:
            time.sleep(0.005)


def slow_worker(args: argparse.Namespace, recorder: Recorder, delay: float) -> None:
    if stop.wait(delay):
        return
    while not stop.is_set():
        start = time.time()
        _ok, outcome, _body = request(args.host, args.port, f"/slow?seconds={args.slow_seconds}",
                                      args.slow_seconds + args.timeout)
        recorder.add_slow(start, time.time(), outcome)


def report(recorder: Recorder, started: float) -> dict[str, Any]:
    fast = sorted(recorder.fast)
    outcomes = Counter(outcome for _s, _e, outcome, _v in fast)
    successes = sorted(end for _s, end, outcome, _v in fast if outcome == "ok")
    gaps = [b - a for a, b in itertools.pairwise(successes)]
    failures = [{"start": s, "end": e, "outcome": o, "version": v}
                for s, e, o, v in fast if o != "ok"]
    versions = Counter(v for _s, _e, o, v in fast if o == "ok")
    duration = time.time() - started
    return {
        "duration": duration,
        "requests": len(fast),
        "succeeded": outcomes.get("ok", 0),
        "failed": len(fast) - outcomes.get("ok", 0),
        "failures_by_kind": {k: v for k, v in outcomes.items() if k != "ok"},
        "failures": failures[:50],
        "requests_per_second": len(fast) / duration if duration else 0,
        "longest_gap": max(gaps, default=0.0),
        "versions": dict(versions),
        # Failed requests by the VERSION their answer named (an error page that names it).
        "failed_versions": dict(Counter(v for _s, _e, o, v in fast if o != "ok" and v)),
        # Successes by VERSION@INSTANCE, for apps that name the instance (its port) that answered.
        "instances": dict(recorder.instances),
        "slow": [{"start": s, "end": e, "outcome": o} for s, e, o in sorted(recorder.slow)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--fast", type=int, default=4, help="threads sending GET / (default 4)")
    parser.add_argument("--slow", type=int, default=2, help="threads sending slow requests")
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout")
    parser.add_argument("--raw", help="also write every fast request (start, end, outcome, "
                        "version) to this JSON file")
    parser.add_argument("--answers", help="also write when each answered fast request started and "
                        "the release that answered it ([start, version]) to this JSON file")
    args = parser.parse_args()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    recorder = Recorder()
    started = time.time()
    threads = [threading.Thread(target=fast_worker, args=(args, recorder)) for _ in range(args.fast)]
    threads += [threading.Thread(target=slow_worker,
                                 args=(args, recorder, i * args.slow_seconds / max(args.slow, 1)))
                for i in range(args.slow)]
    for thread in threads:
        thread.start()
    while not stop.wait(0.2):
        pass
    for thread in threads:
        thread.join()
    print(json.dumps(report(recorder, started)))
    if args.raw:
        with open(args.raw, "w") as raw:
            json.dump([[s, e, o, v] for s, e, o, v in sorted(recorder.fast)], raw)
    if args.answers:
        with open(args.answers, "w") as answers:
            json.dump([[s, v] for s, _e, o, v in sorted(recorder.fast) if o == "ok"], answers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
