"""What the status says of each domain's certificate: the one the front presents in a TLS
handshake naming the domain, or why there is none."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bluegreen import certificates
from bluegreen.api import dbus
from bluegreen.config import AppConfig, Config
from bluegreen.systemd import UnitStatus


def make_certificate(folder: Path, domain: str, issuer: str, days: int) -> tuple[Path, Path]:
    """A self-signed certificate for ``domain`` issued by ``issuer``, and its key."""
    crt, key = folder / f"{domain}.crt", folder / f"{domain}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", str(days),
                    "-subj", f"/CN={issuer}", "-addext", f"subjectAltName=DNS:{domain}"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return crt, key


@contextlib.contextmanager
def front(folder: Path, certificates_by_name: dict[str, tuple[str, int]],
          aliases: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """A TLS server on loopback presenting each name's certificate (by SNI; an alias gets
    another name's), failing the handshake for a name it has none for, as Caddy does; its
    address."""
    contexts = {}
    for name, (issuer, days) in certificates_by_name.items():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*make_certificate(folder, name, issuer, days))
        contexts[name] = context
    for alias, name in (aliases or {}).items():
        contexts[alias] = contexts[name]
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> int | None:
        if name not in contexts:
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        sock.context = contexts[name]
        return None

    default.sni_callback = pick
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # to see ``stop`` soon
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(5)
            with contextlib.suppress(OSError), default.wrap_socket(connection, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_the_certificate_the_front_presents_gives_its_issuer_and_expiry(tmp_path: Path) -> None:
    with front(tmp_path, {"a.example": ("Pebble Intermediate CA 5e1f", 30)}) as address:
        found = certificates.served("a.example", address)
    assert found is not None
    assert found.issuer == "Pebble Intermediate CA 5e1f"
    assert abs(found.not_after - (time.time() + 30 * 86400)) < 86400 * 1.5


def test_no_certificate_another_names_or_no_front_is_none(tmp_path: Path) -> None:
    with front(tmp_path, {"b.example": ("CA", 1)}) as address:
        assert certificates.served("a.example", address) is None  # the handshake fails
    # A front answering with another name's certificate has none for the domain either.
    with front(tmp_path, {"c.example": ("CA", 1)}, aliases={"a.example": "c.example"}) as address:
        assert certificates.served("c.example", address) is not None
        assert certificates.served("a.example", address) is None
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert certificates.served("a.example", ("127.0.0.1", port), timeout=1) is None  # refused


def caddy_line(level: str, identifier: str, error: str,
               msg: str = "could not get certificate from issuer") -> dict[str, str]:
    return {"MESSAGE": json.dumps({"level": level, "ts": 1.0, "logger": "tls.obtain", "msg": msg,
                                   "identifier": identifier, "error": error})}


def test_the_reason_is_the_last_acme_error_the_front_logged_for_the_domain() -> None:
    newest_first = [
        {"MESSAGE": "plain text, not Caddy's JSON"},
        caddy_line("info", "a.example", "", msg="obtaining certificate"),
        caddy_line("error", "b.example", "connection refused"),
        caddy_line("error", "a.example", "HTTP 400 urn:ietf:params:acme:error:connection"),
        caddy_line("error", "a.example", "an older error"),
    ]
    assert certificates.last_error(newest_first, "a.example") == \
        "could not get certificate from issuer: HTTP 400 urn:ietf:params:acme:error:connection"
    assert certificates.last_error(newest_first, "c.example") == ""


def test_each_domain_gets_its_certificate_or_why_it_has_none() -> None:
    served = {"a.example": certificates.Certificate("Pebble Intermediate CA 1", time.time() + 5 * 86400)}
    errors = {"b.example": "could not get certificate from issuer: refused"}
    listed = certificates.describe(["a.example", "b.example", "c.example"], True,
                                   served.get, lambda d: errors.get(d, ""))
    assert [(d.domain, d.issuer, d.reason) for d in listed] == [
        ("a.example", "Pebble Intermediate CA 1", ""),
        ("b.example", "", "could not get certificate from issuer: refused"),
        ("c.example", "", "not issued yet"),
    ]
    assert listed[0].not_after > time.time() and listed[1].not_after == 0
    stopped = certificates.describe(["a.example"], False, served.get, lambda d: "")
    assert [(d.issuer, d.reason) for d in stopped] == [
        ("", "the front (bluegreen-front.service) is not running")]


class Settings:
    def __init__(self, domains: tuple[str, ...]) -> None:
        self.in_effect = Config(app=AppConfig(domains=domains))


class Controller:
    def __init__(self, domains: tuple[str, ...], front: str) -> None:
        self.observers: list[Any] = []
        self.settings = Settings(domains)
        self.front = front

    @property
    def systemd(self) -> Controller:
        return self

    async def status(self, unit: str) -> UnitStatus:
        assert unit == "bluegreen-front.service"
        return UnitStatus(unit, self.front, "running" if self.front == "active" else "dead")


def test_the_dbus_api_lists_the_apps_domains_with_their_certificates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(certificates, "journal_error", lambda domain: "")

    async def reload() -> list[tuple[str, str]]:
        return []

    def listed(domains: tuple[str, ...], state: str) -> list[list[Any]]:
        controller = Controller(domains, state)
        interface = dbus.ManagerInterface(controller, reload)  # type: ignore[arg-type]
        # The method itself, as dbus-next calls it (its decorator's wrapper drops the result).
        method = dbus.ManagerInterface.ListDomains.__wrapped__
        return asyncio.run(method(interface))

    with front(tmp_path, {"a.example": ("Pebble Intermediate CA 1", 5)}) as address:
        monkeypatch.setattr(certificates, "FRONT_ADDRESS", address)
        running = listed(("a.example", "b.example"), "active")
    assert [(domain, issuer, reason) for domain, issuer, _, reason in running] == [
        ("a.example", "Pebble Intermediate CA 1", ""), ("b.example", "", "not issued yet")]
    assert running[0][2] > time.time()
    assert [row[3] for row in listed(("a.example",), "inactive")] == [certificates.NOT_RUNNING]
    # A front that failed and waits to be restarted serves nothing either.
    assert [row[3] for row in listed(("a.example",), "activating")] == [certificates.NOT_RUNNING]
    assert listed((), "inactive") == []
