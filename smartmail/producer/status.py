"""Message status look-ups for the CLI, the Python API and the HTTP API: one message, or a filtered page of them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from smartmail.addresses import normalize_address
from smartmail.store.engine import reader, session_scope
from smartmail.store.models import Campaign, Message
from smartmail.store.sql import json_attributes
from smartmail.store.sql import messages as messages_sql

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
    "campaign_id",
    "contact_id",
)


def status(message_id: str) -> dict[str, Any] | None:
    """The message's state and delivery details, or None when there is no such message."""
    with session_scope() as session:
        message = session.get(Message, message_id)
        if message is None:
            return None
        return {name: getattr(message, name) for name in _FIELDS}


def list_messages(
    *,
    limit: int = 100,
    after: str | None = None,
    state: str | None = None,
    tag: str | None = None,
    campaign: str | None = None,
    to: str | None = None,
) -> list[dict[str, Any]]:
    """Messages newest first (ids are time-ordered), those older than the message `after`, filtered
    by state, tag, campaign (a name or an id) and recipient address."""
    columns = [getattr(Message, name) for name in _FIELDS]
    with reader() as connection:
        query = select(*columns).order_by(Message.id.desc()).limit(limit)
        if after is not None:
            query = query.where(Message.id < after)
        if state is not None:
            query = query.where(Message.state == state)
        if tag is not None:
            query = query.where(messages_sql.for_bind(connection).has_tag(Message.tags, tag))
        if campaign is not None:
            by_name = select(Campaign.id).where(Campaign.name == campaign).scalar_subquery()
            query = query.where(Message.campaign_id == (int(campaign) if _is_id(campaign) else by_name))
        if to is not None:
            # Recipients are stored as given ('Ann <ann@example.org>'): compare their address part.
            address = json_attributes.for_bind(connection).recipient_address(Message.recipient)
            query = query.where(address == normalize_address(to))
        return [dict(row._mapping) for row in connection.execute(query)]


def _is_id(value: str) -> bool:
    # ASCII digits only ("²".isdigit() is true) and within a BIGINT.
    return value.isascii() and value.isdigit() and len(value) < 19
