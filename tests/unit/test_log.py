from __future__ import annotations

import logging
from typing import Any

from bluegreen import log
from bluegreen.log import MessageId, fields


def test_journal_entries_carry_message_id_and_fields() -> None:
    sent: list[dict[str, Any]] = []

    def sender(MESSAGE: str, **extra: Any) -> None:  # noqa: N803 (journal.send's own name)
        sent.append({"MESSAGE": MESSAGE, **extra})

    log.setup(sender_function=sender)
    try:
        logging.getLogger("bluegreen").info(
            "deployment %d succeeded", 7,
            extra=fields(message_id=MessageId.DEPLOY_SUCCEEDED, deployment_id=7, release="abc",
                         port=8123, unit=None))
    finally:
        logging.getLogger().handlers.clear()
    (entry,) = sent
    assert entry["MESSAGE"] == "deployment 7 succeeded"
    assert entry["MESSAGE_ID"] == MessageId.DEPLOY_SUCCEEDED
    assert entry["DEPLOYMENT_ID"] == "7" and entry["RELEASE"] == "abc" and entry["PORT"] == "8123"
    assert "UNIT" not in entry
    assert entry["SYSLOG_IDENTIFIER"] == "bluegreen"


def test_message_ids_are_distinct_128_bit_ids() -> None:
    ids = [m.value for m in MessageId]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
