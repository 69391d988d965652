from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bluegreen.config import Config, behind_front
from bluegreen.health import (
    Check,
    Failures,
    Monitor,
    NotHealthy,
    Probe,
    best,
    fallback_note,
    probe,
    wait_healthy,
)


class Server:
    """A real HTTP server on loopback whose answers the test scripts."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.flapping = False
        self.served = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.served += 1
                    if server.flapping:
                        status = 200 if server.served % 2 else 500
                    else:
                        status = server.statuses.pop(0) if server.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server() -> Iterator[Server]:
    instance = Server()
    yield instance
    instance.httpd.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAST = Check(path="/", interval=0.01, timeout=0.5, healthy_threshold=3, deadline=2)


async def running() -> None:
    return None


def test_probe_reports_status_and_errors(server: Server) -> None:
    server.statuses = [200, 503]
    assert asyncio.run(probe(server.port, Check(timeout=1))).ok
    failed = asyncio.run(probe(server.port, Check(timeout=1)))
    assert not failed.ok and failed.reason == "HTTP 503 from /health"
    refused = asyncio.run(probe(free_port(), Check(timeout=1)))
    assert not refused.ok and refused.reason == "Connection refused"


def test_probe_times_out_on_a_silent_server() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        result = asyncio.run(probe(silent.getsockname()[1], Check(path="/", timeout=0.2)))
    assert not result.ok and "no answer within 0.2 s" in result.reason


def test_healthy_needs_consecutive_passes(server: Server) -> None:
    server.statuses = [200, 200, 500, 200, 200, 200]
    assert asyncio.run(wait_healthy(server.port, FAST, running)).ok
    assert server.served == 6


def test_flapping_never_becomes_healthy(server: Server) -> None:
    server.flapping = True
    with pytest.raises(NotHealthy, match="not healthy within 2 s; last check: HTTP"):
        asyncio.run(wait_healthy(server.port, FAST, running))
    assert server.served > 10


def test_a_dead_unit_fails_at_once(server: Server) -> None:
    async def dead() -> str:
        return "bluegreen-app@1.service exited with status 4"

    with pytest.raises(NotHealthy, match="exited with status 4"):
        asyncio.run(wait_healthy(server.port, FAST, dead))


def test_monitor_reports_unhealthy_after_the_threshold_and_recovery() -> None:
    changes: list[tuple[bool, str]] = []

    async def on_change(healthy: bool, reason: str) -> None:
        changes.append((healthy, reason))

    monitor = Monitor(Check(unhealthy_threshold=3), lambda: (8000,), on_change)

    async def feed() -> None:
        for ok in (False, False, True, False, False, False, False, True):
            await monitor.record(Probe(ok, "HTTP 200" if ok else "HTTP 500 from /health"))

    asyncio.run(feed())
    assert changes == [(False, "3 failed checks in a row: HTTP 500 from /health"), (True, "HTTP 200")]
    assert monitor.healthy


def test_a_release_is_healthy_while_one_instance_passes() -> None:
    failing, passing = Probe(False, "Connection refused"), Probe(True, "HTTP 200")
    assert best((8001, 8002), [failing, passing]) == passing
    assert best((8001,), [failing]) == failing
    assert best((8001, 8002), [failing, failing]).reason == (
        "port 8001: Connection refused; port 8002: Connection refused")


def test_a_check_is_the_configuration_s() -> None:
    assert Check.of(Config()) == Check(strict=False)
    assert Check.of(replace(Config(), app=replace(Config().app, health_path="/health"))) == Check()
    config = Config()
    config = replace(config, app=replace(config.app, health_path="/up", health_host="blog.test"),
                     health=replace(config.health, timeout=0.5, unhealthy_threshold=5))
    check = Check.of(config)
    assert (check.path, check.host, check.timeout, check.unhealthy_threshold) == (
        "/up", "blog.test", 0.5, 5)


def test_failures_count_only_in_a_row() -> None:
    failures = Failures()
    failing, passing = Probe(False, "HTTP 500 from /health"), Probe(True, "HTTP 200")
    assert [failures.count(result, 2) for result in (failing, passing, failing, failing, failing)] == [
        None, None, None, "2 failed checks in a row: HTTP 500 from /health",
        "3 failed checks in a row: HTTP 500 from /health"]


def test_a_check_sends_the_first_domain_unless_health_host_is_set() -> None:
    config = Config()
    assert Check.of(config).host == "localhost"
    fronted = replace(config, app=replace(config.app, domains=("shop.example.com", "www.shop.example.com")))
    assert Check.of(fronted).host == "shop.example.com"
    named = replace(fronted, app=replace(fronted.app, health_host="health.internal"))
    assert Check.of(named).host == "health.internal"


def bad_request_server(body: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.mark.parametrize("body", [
    b"<h1>Bad Request (400)</h1>",  # Django with DEBUG = False
    b"<title>DisallowedHost at /health</title> Invalid HTTP_HOST header: 'localhost'.",
])
def test_a_400_names_the_host_header_and_allowed_hosts(body: bytes) -> None:
    httpd = bad_request_server(body)
    try:
        result = asyncio.run(probe(httpd.server_address[1], Check(host="localhost", timeout=1)))
    finally:
        httpd.shutdown()
    assert not result.ok
    assert result.reason.startswith("HTTP 400 from /health")
    assert "Host: localhost" in result.reason and "ALLOWED_HOSTS" in result.reason
    assert "app.health_host" in result.reason
    assert (b"DisallowedHost" in body) == result.reason.startswith("HTTP 400 from /health: DisallowedHost")


class Routes:
    """A real HTTP server on loopback answering each path with the status the test gives it
    (404 for any other), and keeping the headers of every request."""

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        self.asked: list[tuple[str, dict[str, str]]] = []
        routes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                routes.asked.append((self.path, dict(self.headers)))
                status = routes.statuses.get(self.path, 404)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "https://shop.example.com" + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def probe(self, config: Config) -> Probe:
        try:
            return asyncio.run(probe(self.port, replace(Check.of(config), timeout=1)))
        finally:
            self.httpd.shutdown()


def with_app(**changes: Any) -> Config:
    config = Config()
    return replace(config, app=replace(config.app, **changes))


@pytest.mark.parametrize("status", [200, 204, 301, 302, 308, 401, 403, 404])
def test_an_app_without_health_is_checked_on_its_root_unless_health_path_is_set(status: int) -> None:
    # A published app rarely has /health: unset, the check asks "/", where a redirect (to a
    # login page, to https, APPEND_SLASH), a request for credentials or a 404 (an API that
    # serves /api/... alone) proves it up too.
    routes = Routes({"/": status})
    result = routes.probe(Config())
    assert result.ok and result.path == "/", result
    assert [path for path, _ in routes.asked] == ["/health", "/"]
    assert f"HTTP {status} from /" in result.reason and "/health" in result.reason


@pytest.mark.parametrize("statuses", [{"/": 500}, {"/": 503}, {"/": 502}, {"/": 400}])
def test_an_error_on_the_root_is_never_healthy(statuses: dict[str, int]) -> None:
    result = Routes(statuses).probe(Config())
    assert not result.ok and result.path == "/", result
    assert f"HTTP {statuses['/']} from /" in result.reason, result.reason
    assert "app.health_path" in result.reason, result.reason


def test_a_health_route_that_fails_is_not_passed_over() -> None:
    for status in (500, 503, 400):
        routes = Routes({"/health": status, "/": 200})
        assert not routes.probe(Config()).ok and [path for path, _ in routes.asked] == ["/health"]


def test_an_app_with_health_is_checked_there_alone() -> None:
    routes = Routes({"/health": 200, "/": 500})
    result = routes.probe(Config())
    assert result.ok and result.path == "/health" and [p for p, _ in routes.asked] == ["/health"]
    assert not Routes({"/health": 500, "/": 200}).probe(Config()).ok


@pytest.mark.parametrize("statuses", [{"/": 200}, {"/health": 302, "/": 200}])
def test_a_health_path_set_is_strict_about_2xx_and_has_no_fallback(statuses: dict[str, int]) -> None:
    routes = Routes(statuses)
    result = routes.probe(with_app(health_path="/health"))
    assert not result.ok and result.path == "/health", result
    assert [path for path, _ in routes.asked] == ["/health"]


def test_the_monitor_follows_the_same_decision_as_the_deploy() -> None:
    routes = Routes({"/": 302})
    seen: list[Probe] = []
    changes: list[tuple[bool, str]] = []

    async def on_probe(port: int, result: Probe) -> None:
        seen.append(result)

    async def on_change(healthy: bool, reason: str) -> None:
        changes.append((healthy, reason))

    async def watch() -> None:
        check = replace(Check.of(Config()), interval=0.01, timeout=1, unhealthy_threshold=1)
        monitor = Monitor(check, lambda: (routes.port,), on_change, on_probe)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(monitor.run(), 0.3)

    try:
        asyncio.run(watch())
    finally:
        routes.httpd.shutdown()
    assert seen and all(result.ok and result.path == "/" for result in seen), seen
    assert changes == []


def test_ready_says_once_which_path_it_checked() -> None:
    routes = Routes({"/": 200})
    check = replace(Check.of(Config()), interval=0.01, timeout=1, healthy_threshold=2)
    try:
        passed = asyncio.run(wait_healthy(routes.port, check, running))
    finally:
        routes.httpd.shutdown()
    note = fallback_note(check, passed)
    assert note is not None and "/health" in note and "app.health_path" in note, note
    assert "checked on /" in note
    assert fallback_note(check, Probe(True, "HTTP 200", "/health")) is None


def test_checks_behind_the_front_say_https_as_the_front_does() -> None:
    # Django's SECURE_SSL_REDIRECT, Flask-Talisman: plain http gets a redirect; the front's
    # requests say X-Forwarded-Proto: https, which the instance believes from 127.0.0.1.
    fronted = with_app(domains=("shop.example.com",), health_path="/health")
    assert fronted.app.forwarded_allow_ips == "" and "127.0.0.1" in behind_front(
        fronted).app.forwarded_allow_ips
    routes = Routes({"/health": 200})
    assert routes.probe(fronted).ok
    headers = routes.asked[0][1]
    assert headers.get("X-Forwarded-Proto") == "https" and headers["Host"] == "shop.example.com"
    plain = Routes({"/health": 200})
    assert plain.probe(with_app(health_path="/health")).ok
    assert "X-Forwarded-Proto" not in plain.asked[0][1]
