"""The frequency cap: the marketing emails a contact got lately, and when one more is allowed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.engine import Connection

from smartmail.config import get_settings
from smartmail.store.models import Event, EventType, StepRun

_CHUNK = 5000


def caps() -> list[tuple[int, timedelta]]:
    """(emails, window) for each cap set: SMARTMAIL_FREQUENCY_CAP_DAY and _WEEK; none when both are 0."""
    settings = get_settings()
    given = ((settings.frequency_cap_day, timedelta(days=1)), (settings.frequency_cap_week, timedelta(days=7)))
    return [(cap, window) for cap, window in given if cap]


def recent_sends(connection: Connection, contact_ids: Sequence[int], now: datetime) -> dict[int, list[datetime]]:
    """When each contact was sent marketing email within the longest cap's window: workflow send
    steps and campaign emails sent (transactional mail does not count; campaign emails still
    queued do not either). Empty when no cap is set."""
    windows = [window for _, window in caps()]
    sent: dict[int, list[datetime]] = defaultdict(list)
    if not windows or not contact_ids:
        return sent
    since = now - max(windows)
    ids = sorted(set(contact_ids))
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for contact_id, at in connection.execute(
            select(StepRun.contact_id, StepRun.ran_at).where(
                StepRun.contact_id.in_(chunk),
                StepRun.kind == "send",
                StepRun.message_id.is_not(None),  # a send that failed to render sent nothing
                StepRun.ran_at > since,
            )
        ):
            sent[contact_id].append(at)
        for event_contact, at in connection.execute(
            select(Event.contact_id, Event.occurred_at).where(
                Event.contact_id.in_(chunk),
                Event.type == EventType.SENT.value,
                Event.occurred_at > since,
                Event.campaign_id.is_not(None),
            )
        ):
            sent[event_contact or 0].append(at)
    return sent


def held_until(sent: Sequence[datetime], now: datetime) -> datetime | None:
    """None when one more email keeps the contact within every cap, given when it was `sent` marketing
    email; else when to try again: once the oldest email counted in the window leaves it."""
    until = None
    for cap, window in caps():
        recent = sorted(at for at in sent if at > now - window)
        if len(recent) >= cap:
            free = max(recent[0] + window if recent else now, now + timedelta(minutes=1))
            until = max(until or free, free)
    return until
