"""Secrets: the git token, the ssh key and the webhook secret.

Read from systemd credentials ($CREDENTIALS_DIRECTORY, set by LoadCredential= in a drop-in of
bluegreen.service), else (but the ssh key) from the controller's environment (GITHUB_TOKEN,
WEBHOOK_SECRET, for example in a root-only /etc/default/bluegreen). A secret never goes into an
argv, a log line, a record or an error: the token reaches git only through git's own
environment, the ssh key only as a file ssh reads (the credential itself, which systemd makes
readable by the controller alone), and every text bluegreen keeps or shows passes through
``redact``.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

GIT_TOKEN = ("github-token", "GITHUB_TOKEN")
WEBHOOK_SECRET = ("webhook-secret", "WEBHOOK_SECRET")
SSH_KEY = "ssh-key"


def read(name: tuple[str, str], environ: Mapping[str, str] | None = None) -> str:
    """The secret from the credentials directory or the environment ("" if neither has it)."""
    environ = os.environ if environ is None else environ
    credential, variable = name
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        try:
            return (Path(directory) / credential).read_text().strip()
        except FileNotFoundError:
            pass
    return environ.get(variable, "").strip()


@dataclass(frozen=True)
class Secrets:
    git_token: str = ""
    webhook_secret: str = ""
    ssh_key: Path | None = None  # the credential's file: ssh reads the key from there
    _redacted: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:  # never print a secret, even by accident
        return "Secrets(<redacted>)"

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Secrets:
        token = read(GIT_TOKEN, environ)
        secret = read(WEBHOOK_SECRET, environ)
        forms = [s for s in (token, secret) if len(s) >= 4]
        if token:
            forms.append(base64.b64encode(f"x-access-token:{token}".encode()).decode())
        return cls(token, secret, ssh_key_file(environ), tuple(forms))

    def git_environment(self, url: str) -> dict[str, str]:
        """Environment for git that sends the token to the repository's host only."""
        if not self.git_token:
            return {}
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return {}
        basic = base64.b64encode(f"x-access-token:{self.git_token}".encode()).decode()
        port = f":{parts.port}" if parts.port else ""
        return {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": f"http.{parts.scheme}://{parts.hostname}{port}/.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
        }

    def redact(self, text: str) -> str:
        """``text`` without the secrets and without credentials written into URLs."""
        for secret in self._redacted:
            text = text.replace(secret, "<redacted>")
        return redact_url_credentials(text)


def ssh_key_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """The ssh-key credential's file, if bluegreen.service loads one."""
    environ = os.environ if environ is None else environ
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory or not (Path(directory) / SSH_KEY).is_file():
        return None
    return Path(directory) / SSH_KEY


def redact_url_credentials(text: str) -> str:
    return re.sub(r"([a-z][a-z0-9+.-]*://)[^@/\s]+@", r"\1<redacted>@", text)
