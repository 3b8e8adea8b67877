"""KPIs from the roll-ups, per campaign and per period: each rate with its numerator and denominator, or None."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from smartmail.analytics.rollups import ALL, CAMPAIGN, DAY, DIMENSIONS, GRANULARITIES, HOUR, bucket_start
from smartmail.errors import InvalidInput
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
    "conversion_rate": ("converted", "delivered"),
}
MAX_BUCKETS = 2000  # a period series' length: about 83 days of hours, 5 years of days
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
    "converted": "messages converted: the contact's goal event within the window after a human click, once per message",
    "revenue_cents": "the amounts of the goal events attributed to a click (each one, not only the first), in cents",
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
        "converted": get("converted"),
        "revenue_cents": get("revenue_cents"),
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
    return {
        "campaign_id": campaign_id,
        "counts": counts,
        "kpis": kpis_of(counts),
        "revenue_cents": int(counts.get("revenue_cents", 0)),
    }


def _checked_period(since: datetime, until: datetime, granularity: str, dimension: str) -> list[datetime]:
    """The starts (naive UTC) of the buckets meeting [since, until); InvalidInput naming the field."""
    if granularity not in GRANULARITIES:
        raise InvalidInput(f"granularity must be one of {', '.join(GRANULARITIES)}", field="granularity")
    if dimension not in DIMENSIONS:
        raise InvalidInput(f"dimension must be one of {', '.join(DIMENSIONS)}", field="dimension")
    if (since.tzinfo is None) != (until.tzinfo is None):
        raise InvalidInput("since and until must both have a time zone, or neither", field="until")
    if until <= since:
        raise InvalidInput("until must be after since", field="until")
    step = timedelta(hours=1) if granularity == HOUR else timedelta(days=1)
    first, last = bucket_start(since, granularity), bucket_start(until, granularity)
    exact = until.astimezone(UTC).replace(tzinfo=None) if until.tzinfo is not None else until
    end = last if last == exact else last + step  # a bucket `until` falls inside is included
    if (end - first) / step > MAX_BUCKETS:
        raise InvalidInput(f"at most {MAX_BUCKETS} {granularity} buckets in one series", field="since")
    return [first + step * n for n in range(int((end - first) / step))]


def period_kpis(
    since: datetime,
    until: datetime,
    granularity: str,
    dimension: str = ALL,
    value: str = "",
    *,
    connection: Connection | None = None,
) -> list[dict[str, Any]]:
    """The KPIs of each hour or day bucket from the one holding `since` up to `until` (a bucket
    `until` falls inside is included), for one value of a dimension ("all" and "": everything): every
    bucket of the period, those without events with empty counts and None rates, oldest first. Each
    item: {bucket_start (naive UTC), counts, kpis, revenue_cents}. One range of the roll-ups' key."""
    starts = _checked_period(since, until, granularity, dimension)
    query = select(Rollup.bucket_start, Rollup.metric, Rollup.count).where(
        Rollup.dimension == dimension,
        Rollup.value == value,
        Rollup.granularity == granularity,
        Rollup.bucket_start >= starts[0],
        Rollup.bucket_start <= starts[-1],
    )
    if connection is not None:
        rows = connection.execute(query).all()
    else:
        with get_engine().connect() as connection:
            rows = connection.execute(query).all()
    counts: dict[datetime, dict[str, int]] = {start: {} for start in starts}
    for start, metric, n in rows:
        counts.setdefault(start, {})[metric] = int(n)
    return [
        {
            "bucket_start": start,
            "counts": counts[start],
            "kpis": kpis_of(counts[start]),
            "revenue_cents": counts[start].get("revenue_cents", 0),
        }
        for start in starts
    ]
