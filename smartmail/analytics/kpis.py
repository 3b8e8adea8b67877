"""Campaign KPIs from the roll-ups: each rate with its numerator and denominator, None when nothing to divide by."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from smartmail.analytics.rollups import CAMPAIGN, DAY
from smartmail.store.engine import get_engine
from smartmail.store.models import Rollup

# A bounce arrives after the relay accepted the message (a DSN, a provider's notice): a hard-bounced
# message was counted `sent` first, so it leaves "delivered" rather than adding to "attempted".
_DEFINITIONS: dict[str, tuple[str, str]] = {
    "delivery_rate": ("delivered", "attempted"),
    "bounce_rate": ("bounced", "sent"),
    "open_rate": ("opened_unique_human", "delivered"),
    "click_through_rate": ("clicked_messages_human", "delivered"),
    "click_to_open_rate": ("clicked_messages_human", "opened_unique_human"),
    "unsubscribe_rate": ("unsubscribed", "delivered"),
    "complaint_rate": ("complained", "delivered"),
}
# What each numerator and denominator counts, stated with the numbers.
QUANTITIES = {
    "attempted": "sent + failed: messages the relay answered for good",
    "sent": "messages the relay accepted",
    "delivered": "sent - bounced_hard: accepted and not bounced back for good",
    "bounced": "bounced_hard + bounced_soft: bounce reports received",
    "opened_unique_human": "messages opened by a person (first human open; proxy and scanner opens left out)",
    "clicked_messages_human": "messages with a human click on any link (link scanners left out)",
    "unsubscribed": "unsubscribes",
    "complained": "spam complaints",
}


def quantities(counts: Mapping[str, int]) -> dict[str, int]:
    """The numerators and denominators from the rolled-up counters (a missing counter is 0)."""
    get = lambda name: int(counts.get(name, 0))
    sent = get("sent")
    return {
        "attempted": sent + get("failed"),
        "sent": sent,
        "delivered": max(sent - get("bounced_hard"), 0),
        "bounced": get("bounced_hard") + get("bounced_soft"),
        "opened_unique_human": get("opened_unique_human"),
        "clicked_messages_human": get("clicked_messages_human"),
        "unsubscribed": get("unsubscribed"),
        "complained": get("complained"),
    }


def kpis_of(counts: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Each KPI as {value, numerator, denominator, numerator_is, denominator_is}; value None when the
    denominator is 0 (no rate, rather than a rate of 0)."""
    have = quantities(counts)
    kpis: dict[str, dict[str, Any]] = {}
    for name, (numerator, denominator) in _DEFINITIONS.items():
        top, bottom = have[numerator], have[denominator]
        kpis[name] = {
            "value": top / bottom if bottom else None,
            "numerator": top,
            "denominator": bottom,
            "numerator_is": f"{numerator}: {QUANTITIES[numerator]}",
            "denominator_is": f"{denominator}: {QUANTITIES[denominator]}",
        }
    return kpis


def campaign_counts(campaign_id: int, *, connection: Connection | None = None) -> dict[str, int]:
    """A campaign's rolled-up counters over its whole life (the daily buckets: fewer rows than hourly)."""
    query = (
        select(Rollup.metric, func.sum(Rollup.count))
        .where(
            Rollup.dimension == CAMPAIGN,
            Rollup.value == str(campaign_id),
            Rollup.granularity == DAY,
        )
        .group_by(Rollup.metric)
    )
    if connection is not None:
        return {metric: int(total) for metric, total in connection.execute(query)}
    with get_engine().connect() as connection:
        return {metric: int(total) for metric, total in connection.execute(query)}


def campaign_kpis(campaign_id: int) -> dict[str, Any]:
    """The campaign's KPIs from the roll-ups, with the counters they came from."""
    counts = campaign_counts(campaign_id)
    return {"campaign_id": campaign_id, "counts": counts, "kpis": kpis_of(counts)}
