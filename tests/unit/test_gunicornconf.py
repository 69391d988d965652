"""bluegreen.gunicornconf against a real gunicorn (gthread worker, keep-alive) on loopback.

Debian's gunicorn (20.1, run as /usr/bin/python3 -m gunicorn) always; other versions too when
BLUEGREEN_TEST_GUNICORN_PYTHONS names the pythons of venvs that hold them (space-separated),
for example a venv with gunicorn 23 (req.force_close) and one with 21.2 (the fallback).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bluegreen import gunicornconf
from tests.keepalive import Closed, Connection

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHONS = ["/usr/bin/python3", *os.environ.get("BLUEGREEN_TEST_GUNICORN_PYTHONS", "").split()]
KEEPALIVE = 1  # gunicorn's --keep-alive for these tests (its default is 2 s)
# gthread looks for expired keep-alive connections once per turn of its loop, which waits for
# events at most 1 s: an idle connection goes between KEEPALIVE and KEEPALIVE + 1 s after its
# last response.
IDLE_CLOSE_WITHIN = KEEPALIVE + 1.5

APP = '''import os


def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        body = environ["wsgi.input"].read()
    else:
        body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


@dataclass
class Server:
    port: int
    flag: Path
    version: str

    def connect(self) -> Connection:
        return Connection("127.0.0.1", self.port, timeout=10)


def gunicorn_version(python: str) -> str | None:
    result = subprocess.run([python, "-c", "import gunicorn; print(gunicorn.__version__)"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


@contextlib.contextmanager
def gunicorn(python: str, directory: Path, env: dict[str, str], *args: str) -> Iterator[int]:
    """gunicorn with bluegreen.gunicornconf serving ``directory``'s wsgiapp:app on a port of
    loopback (returned once it answers), with ``env`` and gunicorn's ``args``."""
    version = gunicorn_version(python)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    log = directory / "gunicorn.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "PYTHONDONTWRITEBYTECODE": "1", **env}
    with open(log, "w") as output:
        process = subprocess.Popen(
            [python, "-m", "gunicorn", "-c", "python:bluegreen.gunicornconf",
             "--bind", f"fd://{listener.fileno()}", *args, "--chdir", str(directory),
             "wsgiapp:app"],
            pass_fds=[listener.fileno()], env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT)
    listener.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = Connection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/")
                connection.close()
                break
            except (OSError, Closed):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gunicorn {version} did not serve:\n{log.read_text()}")
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=40)


@pytest.fixture(scope="module", params=PYTHONS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    python = request.param
    version = gunicorn_version(python)
    if version is None:
        pytest.skip(f"{python} cannot import gunicorn")
    directory = tmp_path_factory.mktemp("gunicorn")
    (directory / "wsgiapp.py").write_text(APP)
    flag = directory / "8000.drain"
    try:
        with gunicorn(python, directory, {"BLUEGREEN_DRAIN_FILE": str(flag)},
                      "--worker-class", "gthread", "--workers", "1", "--threads", "4",
                      "--keep-alive", str(KEEPALIVE)) as port:
            yield Server(port, flag, version)
    finally:
        flag.unlink(missing_ok=True)


def closed_by_server(connection: Connection, within: float) -> float:
    """Wait until the server closes ``connection`` cleanly (FIN, no reset); return how long it took."""
    started = time.monotonic()
    connection.sock.settimeout(within)
    assert connection.sock.recv(1) == b"", "the server sent bytes nobody asked for"
    return time.monotonic() - started


def test_connection_is_reused_without_the_flag(server: Server) -> None:
    connection = server.connect()
    try:
        for _ in range(3):
            response = connection.request("GET", "/")
            assert response.status == 200
            assert response.headers["connection"] == "keep-alive", (server.version, response.headers)
        assert connection.answered == 3
        assert not connection.dropped()
    finally:
        connection.close()


def test_flag_makes_the_next_response_close_the_connection(server: Server) -> None:
    connection = server.connect()
    try:
        assert connection.request("GET", "/").headers["connection"] == "keep-alive"
        server.flag.touch()
        body = os.urandom(5000)
        response = connection.request("POST", "/echo", body)
        assert response.status == 200 and response.body == body
        assert response.headers["connection"] == "close", (server.version, response.headers)
        assert closed_by_server(connection, within=2) < 2
    finally:
        connection.close()
        server.flag.unlink(missing_ok=True)


def test_every_response_closes_while_the_flag_exists_and_none_after(server: Server) -> None:
    server.flag.touch()
    try:
        for _ in range(3):  # new connections too, the next request of every worker thread
            connection = server.connect()
            try:
                assert connection.request("GET", "/").headers["connection"] == "close"
            finally:
                connection.close()
    finally:
        server.flag.unlink()
    connection = server.connect()  # a switch back: the instance keeps connections alive again
    try:
        for _ in range(2):
            assert connection.request("GET", "/").headers["connection"] == "keep-alive"
    finally:
        connection.close()


def test_idle_connections_close_at_the_keepalive_timeout(server: Server) -> None:
    connections = [server.connect() for _ in range(3)]
    try:
        for connection in connections:
            assert connection.request("GET", "/").headers["connection"] == "keep-alive"
        server.flag.touch()
        for connection in connections:
            assert closed_by_server(connection, within=IDLE_CLOSE_WITHIN) < IDLE_CLOSE_WITHIN
    finally:
        for connection in connections:
            connection.close()
        server.flag.unlink(missing_ok=True)


# --- the module itself -----------------------------------------------------------------------

def test_sets_only_the_request_hooks() -> None:
    config = pytest.importorskip("gunicorn.config")
    settings = config.Config().settings
    assert {name for name in vars(gunicornconf) if name in settings} == {"pre_request",
                                                                        "post_request"}
    config.Config().set("pre_request", gunicornconf.pre_request)  # gunicorn's own validation
    config.Config().set("post_request", gunicornconf.post_request)


class FakeRequest:
    method = "GET"
    path = "/"


def worker(keepalive: int) -> Any:
    config = pytest.importorskip("gunicorn.config").Config()
    config.set("keepalive", keepalive)
    return SimpleNamespace(cfg=config, log=logging.getLogger("test"))


def test_force_close_when_the_request_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "drain"
    monkeypatch.setattr(gunicornconf, "_drain_file", str(flag))
    closed: list[bool] = []
    request = FakeRequest()
    request.force_close = lambda: closed.append(True)  # type: ignore[attr-defined]
    gunicornconf.pre_request(worker(2), request)
    assert closed == []
    flag.touch()
    gunicornconf.pre_request(worker(2), request)
    assert closed == [True]


def test_fallback_turns_keepalive_off_and_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "drain"
    monkeypatch.setattr(gunicornconf, "_drain_file", str(flag))
    monkeypatch.setattr(gunicornconf, "_configured", {})
    this = worker(5)
    gunicornconf.pre_request(this, FakeRequest())
    assert this.cfg.keepalive == 5
    flag.touch()
    for _ in range(2):
        gunicornconf.pre_request(this, FakeRequest())
        assert this.cfg.keepalive == 0
    flag.unlink()
    gunicornconf.pre_request(this, FakeRequest())
    assert this.cfg.keepalive == 5


def test_fallback_leaves_keepalive_0_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gunicornconf, "_drain_file", str(tmp_path / "drain"))
    monkeypatch.setattr(gunicornconf, "_configured", {})
    this = worker(0)
    gunicornconf.pre_request(this, FakeRequest())
    assert this.cfg.keepalive == 0


def test_no_drain_file_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gunicornconf, "_drain_file", "")
    assert not gunicornconf.draining()


SLOW_APP = """import time


def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(1)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""


@pytest.mark.parametrize("python", PYTHONS)
def test_the_workers_serve_as_many_connections_at_once_as_they_are_given(
        python: str, tmp_path: Path) -> None:
    """BLUEGREEN_WORKER_CONNECTIONS (forwarder = "direct": the instance's share of
    ports.max_connections) is gunicorn's worker_connections: a gthread worker with threads to
    spare accepts no more connections than that, and the next one waits in the queue."""
    if gunicorn_version(python) is None:
        pytest.skip(f"{python} cannot import gunicorn")
    (tmp_path / "wsgiapp.py").write_text(SLOW_APP)
    with gunicorn(python, tmp_path, {"BLUEGREEN_WORKER_CONNECTIONS": "2"}, "--worker-class",
                  "gthread", "--workers", "1", "--threads", "4") as port:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            took = sorted(pool.map(lambda _: slow_request(port, started), range(3)))
    assert took[1] < 1.8 <= took[2], took  # two at once, the third after one of them


def slow_request(port: int, started: float) -> float:
    connection = Connection("127.0.0.1", port, timeout=10)
    try:
        assert connection.request("GET", "/slow").status == 200
    finally:
        connection.close()
    return time.monotonic() - started
