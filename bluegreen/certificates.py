"""The certificate of each domain of an app, as the front (front.py) serves it, or why it has
none: what ``bluegreenctl status`` and ``GET /status`` show. Runs in the controller.

The controller asks the front itself, with a TLS handshake on 127.0.0.1:443 naming the domain,
rather than reading the front's storage: Caddy keeps its certificates in directories of mode
0700 of its dynamic user, which the controller cannot read without CAP_DAC_OVERRIDE (its
bounding set keeps CAP_CHOWN and CAP_KILL alone); and the handshake shows what clients get.

The certificate is decoded with ``ssl._ssl._test_decode_cert``, CPython's own decoder of a PEM
file into the dictionary ``getpeercert()`` returns: private, but in every CPython 3 and fixed
with the Debian release bluegreen runs on, where python3-cryptography would be a new
dependency for three fields. Should it ever go, no certificate reads and the unit tests fail.
"""

from __future__ import annotations

import json
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bluegreen.front import UNIT

# Where the front listens for HTTPS, and how long a handshake with it may take.
FRONT_ADDRESS = ("127.0.0.1", 443)
HANDSHAKE_TIMEOUT = 3.0
NOT_RUNNING = f"the front ({UNIT}) is not running"
NOT_ISSUED = "not issued yet"
# How far back in the front's journal an ACME error of a domain is looked for.
JOURNAL_ENTRIES = 2000


@dataclass(frozen=True)
class Certificate:
    issuer: str
    not_after: float  # seconds since the epoch


@dataclass(frozen=True)
class DomainCertificate:
    """A domain and its certificate: issuer and expiry, or ("", 0) and ``reason``."""

    domain: str
    issuer: str
    not_after: float
    reason: str


def decode(path: Path) -> dict[str, Any]:
    decoder: Callable[[str], dict[str, Any]] | None = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decoder is None:
        raise ValueError("this Python cannot decode certificates")
    return decoder(str(path))


def _name(rdns: Iterable[Iterable[tuple[str, str]]]) -> str:
    fields = dict(pair for rdn in rdns for pair in rdn)
    return fields.get("commonName") or fields.get("organizationName") or ", ".join(fields.values())


def served(domain: str, address: tuple[str, int] | None = None,
           timeout: float = HANDSHAKE_TIMEOUT) -> Certificate | None:
    """The certificate the front presents for the domain; None when it has none for it (the
    handshake fails, or the certificate is another name's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # an expired or untrusted certificate is shown too
    try:
        with socket.create_connection(address or FRONT_ADDRESS, timeout) as raw, \
                context.wrap_socket(raw, server_hostname=domain) as tls:
            der = tls.getpeercert(binary_form=True)
        if not der:
            return None
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:
            pem.write(ssl.DER_cert_to_PEM_cert(der))
            pem.flush()
            decoded = decode(Path(pem.name))
        names = {value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"}
        if domain not in names:
            return None
        return Certificate(_name(decoded["issuer"]), float(ssl.cert_time_to_seconds(decoded["notAfter"])))
    except (OSError, ValueError, KeyError):  # ssl.SSLError is an OSError
        return None


def last_error(newest_first: Iterable[Mapping[str, Any]], domain: str) -> str:
    """The front's last error about obtaining the domain's certificate ("" if none): Caddy
    logs JSON lines whose ``identifier`` is the domain."""
    for entry in newest_first:
        try:
            line = json.loads(str(entry.get("MESSAGE", "")))
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("level") == "error" and line.get("identifier") == domain:
            return ": ".join(str(part) for part in (line.get("msg"), line.get("error")) if part)
    return ""


def front_journal(limit: int = JOURNAL_ENTRIES) -> Iterator[Mapping[str, Any]]:
    """The front's last journal entries, newest first."""
    from systemd import journal

    reader = journal.Reader()
    reader.add_match(_SYSTEMD_UNIT=UNIT)
    reader.seek_tail()
    for _ in range(limit):
        entry = reader.get_previous()
        if not entry:
            return
        yield entry


def journal_error(domain: str) -> str:
    try:
        return last_error(front_journal(), domain)
    except OSError:
        return ""


def describe(domains: Iterable[str], front_running: bool,
             certificate_of: Callable[[str], Certificate | None] = served,
             error_of: Callable[[str], str] = journal_error) -> list[DomainCertificate]:
    result = []
    for domain in domains:
        if not front_running:
            result.append(DomainCertificate(domain, "", 0.0, NOT_RUNNING))
            continue
        certificate = certificate_of(domain)
        if certificate is None:
            result.append(DomainCertificate(domain, "", 0.0, error_of(domain) or NOT_ISSUED))
        else:
            result.append(DomainCertificate(domain, certificate.issuer, certificate.not_after, ""))
    return result
