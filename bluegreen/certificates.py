"""The certificate of each domain of an app, as the front (front.py) has stored it, or why it
has none: what ``bluegreenctl status`` and ``GET /status`` show. Runs in the controller, as
root, which may read the front's storage (its unit's StateDirectory).

Caddy's file_system storage keeps a certificate at
``certificates/ISSUER-KEY/DOMAIN/DOMAIN.crt`` (PEM, the leaf first), ISSUER-KEY naming the ACME
directory it came from ("acme-v02.api.letsencrypt.org-directory", "localhost-14000-dir").

The certificate is read with ``ssl._ssl._test_decode_cert``, CPython's own decoder of a PEM
file into the dictionary ``getpeercert()`` returns: private, but in every CPython 3 and fixed
with the Debian release bluegreen runs on, where python3-cryptography would be a new
dependency for two fields. Should it ever go, no certificate reads and the unit tests fail.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bluegreen.front import UNIT

# The front's StateDirectory= seen from root: systemd keeps a DynamicUser's state under
# /var/lib/private and links /var/lib/NAME to it once the unit has run.
STORAGES = (Path("/var/lib/private/bluegreen-front"), Path("/var/lib/bluegreen-front"))
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
    """A domain and its certificate: issuer and expiry, or (0, "") with ``reason``. A stored
    certificate of a front that does not run has a reason too: nobody serves it."""

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


def read(path: Path) -> Certificate | None:
    try:
        decoded = decode(path)
        return Certificate(_name(decoded["issuer"]), float(ssl.cert_time_to_seconds(decoded["notAfter"])))
    except (OSError, ValueError, KeyError, ssl.SSLError):
        return None


def stored(storage: Path, domain: str) -> Certificate | None:
    """The domain's certificate in the storage, of whichever issuer's lasts longest (after a
    change of ACME CA both may be there; Caddy serves the newer)."""
    found = [read(path) for path in (storage / "certificates").glob(f"*/{domain}/{domain}.crt")]
    return max((c for c in found if c is not None), key=lambda c: c.not_after, default=None)


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


def describe(domains: Iterable[str], storage: Path | None, front_running: bool,
             error_of: Callable[[str], str] = journal_error) -> list[DomainCertificate]:
    result = []
    for domain in domains:
        certificate = stored(storage, domain) if storage is not None else None
        if not front_running:
            reason = NOT_RUNNING
        elif certificate is None:
            reason = error_of(domain) or NOT_ISSUED
        else:
            reason = ""
        result.append(DomainCertificate(domain, certificate.issuer if certificate else "",
                                        certificate.not_after if certificate else 0.0, reason))
    return result


def storage() -> Path | None:
    return next((path for path in STORAGES if path.is_dir()), None)
