"""Logging to the journal with structured fields, or to stderr outside systemd.

Key events carry a fixed MESSAGE_ID, so ``journalctl MESSAGE_ID=<id>`` lists, say, every
failed deployment; per-event fields (DEPLOYMENT_ID, RELEASE, PORT, UNIT, STEP) ride on
``extra=`` and show with ``journalctl -o verbose``. Lines about an app other than the default
one start with its name and carry APP=NAME (``journalctl APP=staging``): each app's work runs
in tasks whose context names the app (``APP``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from enum import StrEnum
from typing import Any

from bluegreen.config import DEFAULT_APP


class MessageId(StrEnum):
    DEPLOY_STARTED = "d47ccfad8db24f448805ccc68191458d"
    DEPLOY_SWITCHED = "68b66fb6f2df4de8a09ccf56e3ca7151"
    DEPLOY_SUCCEEDED = "9b3407d108cf4880873df5ed97344d48"
    DEPLOY_FAILED = "72b4c63db33b4be3bc6283440fb8d152"
    UNHEALTHY = "3008c1750dd249f19639579daf10675d"
    RECOVERY = "5d764f25244f4a429dcbbb4f9bc3702a"
    RECONCILED = "f6446fd1ce9949a3ad22290df2d31da5"


log = logging.getLogger("bluegreen")

# The app whose work the current task does (DEFAULT_APP: bluegreen.toml's).
APP: ContextVar[str] = ContextVar("app", default=DEFAULT_APP)


@contextlib.contextmanager
def app_label(app: str) -> Iterator[None]:
    """The lines logged inside are about ``app``; after, about what they were about before."""
    token = APP.set(app)
    try:
        yield
    finally:
        APP.reset(token)


class _AppFilter(logging.Filter):
    """Names the app of each line about an app other than the default one."""

    def filter(self, record: logging.LogRecord) -> bool:
        app = APP.get()
        if app != DEFAULT_APP and not hasattr(record, "APP"):
            record.APP = app
            record.msg = f"{app}: {record.msg}"
        return True


def fields(**values: Any) -> dict[str, Any]:
    """The ``extra=`` of a log call: upper-case journal fields, None values left out."""
    return {key.upper(): str(value) for key, value in values.items() if value is not None}


class _FieldsFormatter(logging.Formatter):
    """For stderr: the message followed by its journal fields as key=value."""

    _standard = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = {k: v for k, v in record.__dict__.items()
                 if k not in self._standard and k.isupper() and k != "MESSAGE_ID"}
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
        return text


def setup(verbose: bool = False, sender_function: Callable[..., Any] | None = None) -> None:
    """Log to the journal when stderr goes there (or a sender is injected), else to stderr."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if sender_function is not None or os.environ.get("JOURNAL_STREAM"):
        from systemd.journal import JournalHandler

        kwargs: dict[str, Any] = {"SYSLOG_IDENTIFIER": "bluegreen"}
        if sender_function is not None:
            kwargs["sender_function"] = sender_function
        handler = JournalHandler(**kwargs)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(levelname)s %(message)s"))
    handler.addFilter(_AppFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
