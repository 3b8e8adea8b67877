"""Analytics reads for reports: KPI series over time from the roll-ups, a campaign's domains and top links."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from smartmail.analytics import kpis
from smartmail.analytics.rollups import ALL, CAMPAIGN, DAY, DIMENSIONS, GRANULARITIES, HOUR, TAG, bucket_start
from smartmail.errors import InvalidInput, NotFound
from smartmail.store import dialect
from smartmail.store.engine import as_stored, get_engine, utcnow
from smartmail.store.models import Campaign, Event, EventType, Message, MessageState, Rollup

MAX_BUCKETS = 2000  # ~83 days by the hour, ~5 years by the day: a chart and a table stay readable
STEP = {HOUR: timedelta(hours=1), DAY: timedelta(days=1)}


def find_campaign(name: str) -> dict[str, Any]:
    """`{id, name, state}` of the campaign by name, or by id for a number (a name wins); NotFound otherwise."""
    conditions = [Campaign.name == name]
    if name.isascii() and name.isdigit() and int(name) < 2**31:
        conditions.append(Campaign.id == int(name))
    with get_engine().connect() as connection:
        for condition in conditions:
            row = connection.execute(select(Campaign.id, Campaign.name, Campaign.state).where(condition)).first()
            if row is not None:
                return {"id": row.id, "name": row.name, "state": row.state}
    raise NotFound(f"no campaign named {name!r}")


EARLIEST, LATEST = datetime(1970, 1, 1), datetime(9000, 1, 1)  # what a report may ask for


def _bound(moment: datetime, field: str, granularity: str) -> datetime:
    try:
        stored = as_stored(moment)
    except OverflowError:  # an aware time whose UTC falls past year 9999
        stored = LATEST
    if not EARLIEST <= stored < LATEST:
        raise InvalidInput(f"must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}", field=field)
    return bucket_start(stored, granularity)


def series(
    *,
    since: datetime,
    until: datetime | None = None,
    granularity: str = DAY,
    dimension: str = ALL,
    value: str = "",
) -> list[dict[str, Any]]:
    """Each hour or day from the one holding `since` to the one holding `until` (default now), oldest
    first: `{start, counts, kpis}`; a bucket without roll-ups is there with zero counts (and None rates)."""
    if granularity not in GRANULARITIES:
        raise InvalidInput(f"granularity must be one of {', '.join(GRANULARITIES)}", field="granularity")
    if dimension not in DIMENSIONS:
        raise InvalidInput(f"dimension must be one of {', '.join(DIMENSIONS)}", field="dimension")
    first, last = _bound(since, "since", granularity), _bound(until or utcnow(), "until", granularity)
    if last < first:
        raise InvalidInput("until is before since", field="until")
    step = STEP[granularity]
    if (last - first) // step + 1 > MAX_BUCKETS:
        raise InvalidInput(
            f"{(last - first) // step + 1} {granularity}s asked for, at most {MAX_BUCKETS}: a later since "
            f"or a coarser granularity",
            field="since",
        )
    query = (
        select(Rollup.bucket_start, Rollup.metric, func.sum(Rollup.count))
        .where(
            Rollup.dimension == dimension,
            Rollup.value == value,
            Rollup.granularity == granularity,
            Rollup.bucket_start >= first,
            Rollup.bucket_start <= last,
        )
        .group_by(Rollup.bucket_start, Rollup.metric)
    )
    found: dict[datetime, dict[str, int]] = {}
    with get_engine().connect() as connection:
        for start, metric, total in connection.execute(query):
            found.setdefault(start, {})[metric] = int(total)
    buckets = []
    start = first
    while start <= last:
        counts = found.get(start, {})
        buckets.append({"start": start, "counts": counts, "kpis": kpis.kpis_of(counts)})
        start += step
    return buckets


def campaign_series(campaign_id: int, **options: Any) -> list[dict[str, Any]]:
    """`series` of one campaign's roll-ups."""
    return series(dimension=CAMPAIGN, value=str(campaign_id), **options)


def totals(buckets: list[dict[str, Any]]) -> dict[str, int]:
    """The buckets' counters added up."""
    summed: dict[str, int] = {}
    for bucket in buckets:
        for metric, count in bucket["counts"].items():
            summed[metric] = summed.get(metric, 0) + count
    return summed


def _domain_of_recipient(bind: Any) -> Any:
    # What rollups.domain_of does in Python: the part after the @, lower case (one @ in a stored address).
    position = func.strpos if dialect.is_postgresql(bind) else func.instr
    return func.lower(func.substr(Message.recipient, position(Message.recipient, "@") + 1))


def domains(campaign_id: int, *, limit: int = 50) -> list[dict[str, Any]]:
    """A campaign's messages by recipient domain, most messages first: `{domain, messages, sent, failed,
    bounced, deferred, pending, suppressed, delivered, attempted, delivery_rate, bounce_rate}`.

    Counted from the campaign's messages as they stand (one query on the indexed campaign_id), not
    from the roll-ups: those count recipient domains across all mail, not per campaign. A message's
    state is its latest word, so `bounced` is hard bounces (the state a hard bounce leaves); soft
    bounces do not change a state and are not in this table. The rates follow kpis: delivery =
    (sent - hard bounced) / (sent + failed), bounce = hard bounced / sent."""
    with get_engine().connect() as connection:
        domain = _domain_of_recipient(connection).label("domain")
        rows = connection.execute(
            select(domain, Message.state, func.count())
            .where(Message.campaign_id == campaign_id)
            .group_by(domain, Message.state)
        ).all()
    by_domain: dict[str, dict[str, int]] = {}
    for name, state, count in rows:
        by_domain.setdefault(name or "", {})[state] = int(count)
    table: list[dict[str, Any]] = []
    for name, states in by_domain.items():
        get = lambda state, states=states: states.get(state.value, 0)
        bounced = get(MessageState.BOUNCED)
        sent = get(MessageState.SENT) + bounced  # a bounced message was accepted first
        failed = get(MessageState.FAILED)
        attempted = sent + failed
        delivered = sent - bounced
        pending = get(MessageState.QUEUED) + get(MessageState.SENDING) + get(MessageState.SCHEDULED)
        table.append(
            {
                "domain": name,
                "messages": sum(states.values()),
                "sent": sent,
                "failed": failed,
                "bounced": bounced,
                "deferred": get(MessageState.DEFERRED),
                "pending": pending,
                "suppressed": get(MessageState.SUPPRESSED),
                "delivered": delivered,
                "attempted": attempted,
                "delivery_rate": delivered / attempted if attempted else None,
                "bounce_rate": bounced / sent if sent else None,
            }
        )
    table.sort(key=lambda row: (-row["messages"], row["domain"]))
    return table[:limit]


def top_links(campaign_id: int, *, limit: int = 10) -> list[dict[str, Any]]:
    """The campaign's most clicked links by people: `{url, clicks, unique}` (unique: a message's first
    click of that link). From the click events of the campaign's messages (through the message id
    index), as the roll-ups do not count clicks per link yet."""
    url = Event.properties["url"].as_string().label("url")
    unique = func.sum(case((Event.properties["unique"].as_boolean().is_(True), 1), else_=0))
    messages = select(Message.id).where(Message.campaign_id == campaign_id).scalar_subquery()
    query = (
        select(url, func.count(), unique)
        .where(
            Event.message_id.in_(messages),
            Event.type == EventType.CLICKED.value,
            Event.machine.is_(False),
        )
        .group_by(url)
        .order_by(func.count().desc(), url)
        .limit(limit)
    )
    with get_engine().connect() as connection:
        return [
            {"url": link or "", "clicks": int(clicks), "unique": int(firsts or 0)}
            for link, clicks, firsts in connection.execute(query)
        ]


def _campaign_span(campaign_id: int) -> tuple[datetime, datetime] | None:
    """The first and last hour with roll-ups of the campaign."""
    query = select(func.min(Rollup.bucket_start), func.max(Rollup.bucket_start)).where(
        Rollup.dimension == CAMPAIGN, Rollup.value == str(campaign_id), Rollup.granularity == HOUR
    )
    with get_engine().connect() as connection:
        first, last = connection.execute(query).one()
    return None if first is None else (first, last)


def campaign_report(name: str) -> dict[str, Any]:
    """What a campaign report shows: the campaign, its KPIs with their counters, its series over its
    active span (by the hour up to three days, by the day beyond), its domains and top links."""
    campaign = find_campaign(name)
    found = kpis.campaign_kpis(campaign["id"])
    span = _campaign_span(campaign["id"])
    first, last = span if span is not None else (bucket_start(utcnow(), HOUR),) * 2
    granularity = HOUR if last - first < timedelta(days=3) else DAY
    first = max(first, bucket_start(last, granularity) - STEP[granularity] * (MAX_BUCKETS - 1))
    return {
        "campaign": campaign,
        "counts": found["counts"],
        "kpis": found["kpis"],
        "granularity": granularity,
        "series": campaign_series(campaign["id"], since=first, until=last, granularity=granularity),
        "domains": domains(campaign["id"]),
        "top_links": top_links(campaign["id"]),
    }


def trends_report(
    *,
    since: datetime,
    until: datetime | None = None,
    granularity: str = DAY,
    campaign: str | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """What a trends report shows: the series of all mail (or of one campaign's, or of the messages
    with one tag), with the KPIs of the whole period."""
    if campaign is not None and tag is not None:
        raise InvalidInput("give a campaign or a tag, not both", field="tag")
    found = find_campaign(campaign) if campaign is not None else None
    dimension, value = (CAMPAIGN, str(found["id"])) if found is not None else (ALL, "")
    if tag is not None:
        dimension, value = TAG, tag
    buckets = series(since=since, until=until, granularity=granularity, dimension=dimension, value=value)
    summed = totals(buckets)
    return {
        "campaign": found,
        "tag": tag,
        "granularity": granularity,
        "since": buckets[0]["start"],
        "until": buckets[-1]["start"] + STEP[granularity],
        "counts": summed,
        "kpis": kpis.kpis_of(summed),
        "series": buckets,
    }
