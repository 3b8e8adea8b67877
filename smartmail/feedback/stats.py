"""A campaign's engagement counts and rates from its events: human hits by default, machine ones apart."""

from __future__ import annotations

from typing import Any

from sqlalchemy import distinct, func, select

from smartmail.store.engine import reader
from smartmail.store.models import Event, EventType, Message, MessageState


def campaign_engagement(campaign_id: int, *, include_machine: bool = False) -> dict[str, Any]:
    """Unique and total opens and clicks of a campaign's messages, and the rates over the messages
    sent and not bounced since (`denominator`: delivered, as mailbox providers count it). Machine
    hits (privacy proxies, link scanners) are left out unless `include_machine`, and always counted
    apart in `machine`. Read from raw rows: fine for one
    campaign; reports over many use roll-ups."""
    kinds = (EventType.OPENED.value, EventType.CLICKED.value)
    counts = (
        select(Event.type, Event.machine, func.count(), func.count(distinct(Event.message_id)))
        .where(Event.campaign_id == campaign_id, Event.type.in_(kinds))
        .group_by(Event.type, Event.machine)
    )
    sent = select(func.count()).where(Message.campaign_id == campaign_id, Message.state == MessageState.SENT.value)
    with reader() as connection:
        rows = connection.execute(counts).all()
        delivered = connection.scalar(sent) or 0
    found = {(kind, machine): (total, unique) for kind, machine, total, unique in rows}

    def summed(kind: str, machines: tuple[bool, ...]) -> tuple[int, int]:
        # Unique messages of human and machine hits may overlap: with both, the larger is a floor.
        parts = [found.get((kind, m), (0, 0)) for m in machines]
        return sum(p[0] for p in parts), max((p[1] for p in parts), default=0)

    counted = (False, True) if include_machine else (False,)
    opens, clicks = summed(kinds[0], counted), summed(kinds[1], counted)

    def rate(part: int, whole: int) -> float | None:
        return round(part / whole, 4) if whole else None

    return {
        "denominator": "messages sent and not bounced",
        "sent": delivered,
        "opens": {"unique": opens[1], "total": opens[0]},
        "clicks": {"unique": clicks[1], "total": clicks[0]},
        "open_rate": rate(opens[1], delivered),
        "click_rate": rate(clicks[1], delivered),
        "click_to_open_rate": rate(clicks[1], opens[1]),
        "machine": {
            "opens": found.get((kinds[0], True), (0, 0))[0],
            "clicks": found.get((kinds[1], True), (0, 0))[0],
        },
        "include_machine": include_machine,
    }
