"""Message status look-ups for the CLI and the Python API."""

from __future__ import annotations

from typing import Any

from smartmail.store.engine import session_scope
from smartmail.store.models import Message

_FIELDS = (
    "id",
    "state",
    "recipient",
    "sender",
    "subject",
    "attempts",
    "created_at",
    "enqueued_at",
    "claimed_at",
    "next_attempt_at",
    "finished_at",
    "smtp_code",
    "smtp_reply",
    "reason",
    "template_name",
    "template_version",
    "message_id_header",
    "tags",
)


def status(message_id: str) -> dict[str, Any] | None:
    """The message's state and delivery details, or None when there is no such message."""
    with session_scope() as session:
        message = session.get(Message, message_id)
        if message is None:
            return None
        return {name: getattr(message, name) for name in _FIELDS}
