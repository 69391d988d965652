"""What the status says of each domain's certificate: read from the front's storage as Caddy
lays it out (certificates/ISSUER-KEY/DOMAIN/DOMAIN.crt), or why there is none."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bluegreen import certificates


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
