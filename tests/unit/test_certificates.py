"""What the status says of each domain's certificate: read from the front's storage as Caddy
lays it out (certificates/ISSUER-KEY/DOMAIN/DOMAIN.crt), or why there is none."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bluegreen import certificates
from bluegreen.api import dbus
from bluegreen.config import AppConfig, Config
from bluegreen.systemd import UnitStatus


def make_certificate(storage: Path, issuer_key: str, domain: str, issuer: str, days: int) -> Path:
    """A self-signed certificate for ``domain`` issued by ``issuer``, where Caddy keeps it."""
    folder = storage / "certificates" / issuer_key / domain
    folder.mkdir(parents=True)
    crt = folder / f"{domain}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(folder / f"{domain}.key"), "-out", str(crt),
                    "-days", str(days), "-subj", f"/CN={issuer}",
                    "-addext", f"subjectAltName=DNS:{domain}"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return crt


def test_a_stored_certificate_gives_its_issuer_and_expiry(tmp_path: Path) -> None:
    make_certificate(tmp_path, "localhost-14000-dir", "a.example", "Pebble Intermediate CA 5e1f", 30)
    found = certificates.stored(tmp_path, "a.example")
    assert found is not None
    assert found.issuer == "Pebble Intermediate CA 5e1f"
    assert abs(found.not_after - (time.time() + 30 * 86400)) < 86400 * 1.5


def test_of_two_issuers_the_certificate_that_lasts_longer_is_the_one_served(tmp_path: Path) -> None:
    make_certificate(tmp_path, "old-ca-directory", "a.example", "Old CA", 2)
    make_certificate(tmp_path, "acme-v02.api.letsencrypt.org-directory", "a.example", "R3", 90)
    found = certificates.stored(tmp_path, "a.example")
    assert found is not None and found.issuer == "R3"


def test_no_certificate_no_storage_or_an_unreadable_one_is_none(tmp_path: Path) -> None:
    assert certificates.stored(tmp_path / "absent", "a.example") is None
    make_certificate(tmp_path, "ca", "b.example", "CA", 1)
    assert certificates.stored(tmp_path, "a.example") is None
    broken = tmp_path / "certificates" / "ca" / "c.example"
    broken.mkdir()
    (broken / "c.example.crt").write_text("not a certificate")
    assert certificates.stored(tmp_path, "c.example") is None


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


def test_each_domain_gets_its_certificate_or_why_it_has_none(tmp_path: Path) -> None:
    make_certificate(tmp_path, "ca", "a.example", "Pebble Intermediate CA 1", 5)
    errors = {"b.example": "could not get certificate from issuer: refused"}
    listed = certificates.describe(["a.example", "b.example", "c.example"], tmp_path,
                                   front_running=True, error_of=lambda d: errors.get(d, ""))
    assert [(d.domain, d.issuer, d.reason) for d in listed] == [
        ("a.example", "Pebble Intermediate CA 1", ""),
        ("b.example", "", "could not get certificate from issuer: refused"),
        ("c.example", "", "not issued yet"),
    ]
    assert listed[0].not_after > time.time() and listed[1].not_after == 0
    stopped = certificates.describe(["c.example"], tmp_path, front_running=False, error_of=lambda d: "")
    assert stopped[0].reason == "the front (bluegreen-front.service) is not running"
    # A certificate kept from before still says what it is, even with the front stopped.
    kept = certificates.describe(["a.example"], tmp_path, front_running=False, error_of=lambda d: "")
    assert kept[0].issuer and kept[0].reason == "the front (bluegreen-front.service) is not running"


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
    make_certificate(tmp_path, "localhost-14000-dir", "a.example", "Pebble Intermediate CA 1", 5)
    monkeypatch.setattr(certificates, "STORAGES", (tmp_path / "private", tmp_path))
    monkeypatch.setattr(certificates, "journal_error", lambda domain: "")

    async def reload() -> list[tuple[str, str]]:
        return []

    def listed(domains: tuple[str, ...], front: str) -> list[list[Any]]:
        controller = Controller(domains, front)
        interface = dbus.ManagerInterface(controller, reload)  # type: ignore[arg-type]
        # The method itself, as dbus-next calls it (its decorator's wrapper drops the result).
        method = dbus.ManagerInterface.ListDomains.__wrapped__
        return asyncio.run(method(interface))

    running = listed(("a.example", "b.example"), "active")
    assert [(domain, issuer, reason) for domain, issuer, _, reason in running] == [
        ("a.example", "Pebble Intermediate CA 1", ""), ("b.example", "", "not issued yet")]
    assert running[0][2] > time.time()
    assert [row[3] for row in listed(("a.example",), "inactive")] == [certificates.NOT_RUNNING]
    # A front that failed and waits to be restarted serves nothing either.
    assert [row[3] for row in listed(("a.example",), "activating")] == [certificates.NOT_RUNNING]
    assert listed((), "inactive") == []
