"""The analytics reader of the event stream: hourly and daily counters per dimension, with their own checkpoint."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from sqlalchemy import String, and_, case, cast, delete, func, literal, null, select, true, tuple_, union_all
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement, Null

from smartmail.audience import event_stream
from smartmail.audience.event_stream import START, Position
from smartmail.config.settings import get_settings
from smartmail.store import checkpoints, dialect
from smartmail.store.engine import get_engine
from smartmail.store.models import Contact, Conversion, Event, EventType, Message, Rollup, StepRun
from smartmail.store.sql import json_attributes
from smartmail.store.sql import rollups as rollup_sql
from smartmail.store.sql.event_stream import stream_horizon
from smartmail.workers.policy import Policy, get_policy

CHECKPOINT = "analytics"  # the stream_checkpoints row: the stream position rolled up to
ROLL_UP_TASK = "smartmail.analytics.roll_up"
MAX_RANGE = 200_000  # events counted, and their counters added, per transaction (one tick at most)

HOUR, DAY = "hour", "day"
GRANULARITIES = (HOUR, DAY)
CAMPAIGN, DOMAIN, ALL = "campaign", "domain", "all"
TEMPLATE, TAG, STEP, VARIANT, SITE, LINK = "template", "tag", "workflow_step", "variant", "site", "link"
# Values: a campaign's id, a recipient domain, a template's name, a message tag (a message with several
# counts under each), "<workflow id>/<step>", "<campaign id>/<variant>", the traffic-shaping site of the
# recipient domain (the domain itself when no site names it), "<campaign id>/<url>" (clicks only), "".
DIMENSIONS = (CAMPAIGN, DOMAIN, TEMPLATE, TAG, STEP, VARIANT, SITE, LINK, ALL)
VALUE_LENGTH = 320  # the column's; a longer value (a long URL) is cut, as the key cannot hold it

# Metrics counted once per event of their type, as the type names them.
_PLAIN = {
    EventType.SENT.value: "sent",
    EventType.DEFERRED.value: "deferred",
    EventType.FAILED.value: "failed",
    EventType.UNSUBSCRIBED.value: "unsubscribed",
    EventType.COMPLAINED.value: "complained",
}
METRICS = (
    "sent",
    "deferred",
    "failed",
    "bounced_hard",
    "bounced_soft",
    "opened_human",
    "opened_machine",
    "opened_unique_human",  # a message's first human open (the event's `unique`, from engagement_firsts)
    "clicked_human",
    "clicked_machine",
    "clicked_unique_human",  # a message's first human click of each link (the event's `unique`)
    "clicked_messages_human",  # a message's first human click of any link, in stream order: CTR's numerator
    "unsubscribed",
    "complained",
    "converted",  # messages converted: a goal event of the contact within the window after a human click
    "revenue_cents",  # the sum of the attributed goal events' `amount` (each order, not only the first), in cents
)
# The counters of a click that a link's roll-up keeps (a message's first click is the message's, not a link's).
_LINK_METRICS = frozenset({"clicked_human", "clicked_machine", "clicked_unique_human"})

Key = tuple[str, str, str, datetime, str]  # (dimension, value, granularity, bucket_start, metric)
Values = list[tuple[str, str]]  # (dimension, value) pairs one message counts under


@dataclass(frozen=True)
class Attribution:
    """A goal event's clicked message: `converted` when it is the message's converting event."""

    message_id: str
    campaign_id: int | None
    converted: bool


def bucket_start(moment: datetime, granularity: str) -> datetime:
    """The start (naive UTC, as the database stores times) of the hour or day holding `moment`."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    if granularity == HOUR:
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rsplit("@", 1)[1].strip().lower() or None


def site_of(domain: str, policy: Policy) -> str:
    """The domain's traffic-shaping site by the policy's domain list alone (no MX look-up: a roll-up
    must not wait on DNS); a domain no site names is a site of its own, as the policy treats it."""
    site = policy.site_for_domain(domain)
    return site.name if site is not None else domain


def cents_of(amount: Any) -> int:
    """A goal event's `amount` (a number, or a number as text) in whole cents; 0 when it is not one."""
    if isinstance(amount, bool) or not isinstance(amount, int | float | str):
        return 0
    try:
        value = Decimal(str(amount).strip())
    except InvalidOperation:
        return 0
    if not value.is_finite():
        return 0
    return int((value * 100).to_integral_value(ROUND_HALF_EVEN))


def metrics_of(event: dict[str, Any], first_click: bool) -> list[str]:
    """The counters one event adds to; `first_click`: it is its message's first human click."""
    kind = event["type"]
    if kind in _PLAIN:
        return [_PLAIN[kind]]
    properties = event.get("properties") or {}
    if kind == EventType.BOUNCED.value:
        return ["bounced_hard" if properties.get("kind") == "hard" else "bounced_soft"]
    if kind in (EventType.OPENED.value, EventType.CLICKED.value):
        if event["machine"]:
            return [f"{kind}_machine"]  # proxies and scanners: kept apart, never unique
        found = [f"{kind}_human"]
        if properties.get("unique") is True:
            found.append(f"{kind}_unique_human")
        if first_click:
            found.append("clicked_messages_human")
        return found
    return []  # custom events and SmartMail's operational ones are not rolled up (goal events: by attribution)


def is_human_click(event: dict[str, Any]) -> bool:
    return event["type"] == EventType.CLICKED.value and not event["machine"] and bool(event["message_id"])


def link_value(event: dict[str, Any]) -> str | None:
    """A campaign click's link: "<campaign id>/<url>" (the link's number when the click has no url)."""
    if event["type"] != EventType.CLICKED.value or event["campaign_id"] is None:
        return None
    properties = event.get("properties") or {}
    target = properties.get("url") or f"#{properties.get('link', 0)}"
    return f"{event['campaign_id']}/{target}"


def message_values(
    *,
    recipient: str | None,
    template_name: str | None = None,
    tags: Iterable[Any] | None = None,
    campaign_id: int | None = None,
    variant: str | None = None,
    steps: Iterable[str] = (),
    policy: Policy | None = None,
) -> Values:
    """The (dimension, value) pairs a message counts under besides its campaign and "all"."""
    values: Values = []
    domain = domain_of(recipient)
    if domain is not None:
        values.append((DOMAIN, domain))
        if policy is not None:
            values.append((SITE, site_of(domain, policy)))
    if template_name:
        values.append((TEMPLATE, template_name))
    values.extend((TAG, str(tag)) for tag in sorted({str(tag) for tag in tags or ()}))
    if variant and campaign_id is not None:
        values.append((VARIANT, f"{campaign_id}/{variant}"))
    values.extend((STEP, step) for step in sorted(set(steps)))
    return values


def count(
    events: Iterable[dict[str, Any]],
    messages: Mapping[str, Values],
    clicked_before: set[str],
    *,
    attributions: Mapping[int, Attribution] | None = None,
    policy: Policy | None = None,
    since: datetime | None = None,
) -> Counter[Key]:
    """The counters a page of events adds, each in the buckets of its own `occurred_at` (a late event
    lands in its old bucket). `messages`: the pairs each message id counts under (`message_values`);
    `clicked_before`: messages with a human click earlier in the stream (updated in place);
    `attributions`: goal events by id, with the message they convert; `since`: events before it are
    left out."""
    counts: Counter[Key] = Counter()
    attributions = attributions or {}
    for event in events:
        first_click = False
        if is_human_click(event) and event["message_id"] not in clicked_before:
            clicked_before.add(event["message_id"])
            first_click = True
        message_id, campaign_id = event["message_id"], event["campaign_id"]
        amounts: dict[str, int] = dict.fromkeys(metrics_of(event, first_click), 1)
        attribution = attributions.get(event.get("id", 0))
        if attribution is not None:  # a goal event counts for the message it converts, not its own
            message_id, campaign_id = attribution.message_id, attribution.campaign_id
            amounts = {"revenue_cents": cents_of((event.get("properties") or {}).get("amount"))}
            if attribution.converted:
                amounts["converted"] = 1
        if not amounts:
            continue
        occurred_at = datetime.fromisoformat(event["occurred_at"])
        if since is not None and bucket_start(occurred_at, DAY) < since:
            continue
        values: Values = [(ALL, "")]
        if campaign_id is not None:
            values.append((CAMPAIGN, str(campaign_id)))
        if message_id and message_id in messages:
            values.extend(messages[message_id])
        else:  # a message gone (or none): the contact's address still names the domain
            values.extend(message_values(recipient=event.get("email"), policy=policy))
        link = link_value(event) if attribution is None else None
        for granularity in GRANULARITIES:
            start = bucket_start(occurred_at, granularity)
            for dimension, value in values:
                for metric, amount in amounts.items():
                    counts[(dimension, value[:VALUE_LENGTH], granularity, start, metric)] += amount
            if link is not None:
                for metric in _LINK_METRICS.intersection(amounts):
                    counts[(LINK, link[:VALUE_LENGTH], granularity, start, metric)] += 1
    return Counter({key: n for key, n in counts.items() if n})  # a goal event without an amount adds no revenue


def _message_values(connection: Connection, ids: Iterable[str], policy: Policy) -> dict[str, Values]:
    """Each message's pairs: one query on the messages, one on the workflow step runs."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    steps: dict[str, list[str]] = {}
    for row in connection.execute(
        select(StepRun.message_id, StepRun.workflow_id, StepRun.step).where(StepRun.message_id.in_(ids))
    ):
        steps.setdefault(row.message_id, []).append(f"{row.workflow_id}/{row.step}")
    rows = connection.execute(
        select(
            Message.id, Message.recipient, Message.template_name, Message.tags, Message.campaign_id, Message.variant
        ).where(Message.id.in_(ids))
    )
    return {
        row.id: message_values(
            recipient=row.recipient,
            template_name=row.template_name,
            tags=row.tags if isinstance(row.tags, list) else (),
            campaign_id=row.campaign_id,
            variant=row.variant,
            steps=steps.get(row.id, ()),
            policy=policy,
        )
        for row in rows
    }


def _clicked_before(connection: Connection, events: list[dict[str, Any]], position: Position) -> set[str]:
    """The page's clicked messages that had a human click at or before `position` (the page's start)."""
    ids = sorted({event["message_id"] for event in events if is_human_click(event)})
    if not ids:
        return set()
    rows = connection.execute(
        select(Event.message_id)
        .where(
            Event.message_id.in_(ids),
            Event.type == EventType.CLICKED.value,
            Event.machine.is_(False),
            tuple_(Event.xact, Event.id) <= tuple_(position.xact, position.id),
        )
        .distinct()
    )
    return {message_id for message_id in rows.scalars() if message_id is not None}


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _attribute(
    connection: Connection, events: list[dict[str, Any]], *, since: datetime | None = None
) -> dict[int, Attribution]:
    """The page's goal events with the message each is attributed to: the contact's latest human click
    within the window before it, among the events before it in the stream (so a repeated or rebuilt
    count finds the same click). The first goal event of a message, in stream order, converts it: a
    `conversions` row, written with the page's counters."""
    settings = get_settings()
    goal = settings.analytics_conversion_event
    if goal is None:
        return {}
    window = timedelta(days=settings.analytics_conversion_days)
    clicks: dict[int, tuple[str, int | None, datetime]] = {}
    for event in events:
        if event["type"] != goal or event["contact_id"] is None:
            continue
        at = _naive(datetime.fromisoformat(event["occurred_at"]))
        if since is not None and bucket_start(at, DAY) < since:
            continue
        position = Position.parse(event["position"])
        # One range of ix_events_contact_id_type_occurred_at per goal event (goal events are few).
        click = connection.execute(
            select(Event.message_id, Event.campaign_id)
            .where(
                Event.contact_id == event["contact_id"],
                Event.type == EventType.CLICKED.value,
                Event.occurred_at >= at - window,
                Event.occurred_at <= at,
                Event.machine.is_(False),
                Event.message_id.isnot(None),
                tuple_(Event.xact, Event.id) < tuple_(position.xact, position.id),
            )
            .order_by(Event.occurred_at.desc(), Event.xact.desc(), Event.id.desc())
            .limit(1)
        ).first()
        if click is not None:
            clicks[event["id"]] = (click.message_id, click.campaign_id, at)
    if not clicks:
        return {}
    first: dict[str, tuple[int, datetime]] = {}  # the page's first goal event of each message
    for event in events:
        if event["id"] in clicks:
            message_id, _, at = clicks[event["id"]]
            first.setdefault(message_id, (event["id"], at))
    rows = [{"message_id": m, "event_id": e, "converted_at": at} for m, (e, at) in sorted(first.items())]
    statement = (
        dialect.insert(connection)(Conversion)
        .on_conflict_do_nothing(index_elements=["message_id"])
        .returning(Conversion.event_id)
    )
    added = {event_id for (event_id,) in connection.execute(statement, rows)}
    return {
        event_id: Attribution(message_id, campaign_id, event_id in added)
        for event_id, (message_id, campaign_id, _) in clicks.items()
    }


def _add(connection: Connection, counts: Counter[Key]) -> None:
    """One upsert adding the page's counters to the stored ones (in key order: the same lock order always)."""
    if not counts:
        return
    rows = [
        {"dimension": d, "value": v, "granularity": g, "bucket_start": b, "metric": m, "count": n}
        for (d, v, g, b, m), n in sorted(counts.items())
    ]
    insert = dialect.insert(connection)(Rollup)
    connection.execute(
        insert.on_conflict_do_update(
            index_elements=["dimension", "value", "granularity", "bucket_start", "metric"],
            set_={"count": Rollup.count + insert.excluded.count},
        ),
        rows,
    )


# The rolled-up metrics an event adds to in SQL, in the order of the counting statement's sums;
# `converted` and `revenue_cents` come from goal events, counted in Python.
_SQL_METRICS = tuple(metric for metric in METRICS if metric not in ("converted", "revenue_cents"))
_COUNTED_TYPES = (*_PLAIN, EventType.BOUNCED.value, EventType.OPENED.value, EventType.CLICKED.value)
_KEYS = ("k1", "k2", "k3")


def _after(position: Position) -> ColumnElement[bool]:
    return tuple_(Event.xact, Event.id) > tuple_(position.xact, position.id)


def _upto(position: Position) -> ColumnElement[bool]:
    return tuple_(Event.xact, Event.id) <= tuple_(position.xact, position.id)


def _range_end(connection: Connection, position: Position, limit: int) -> tuple[Position, int]:
    """Where a range of at most `limit` readable events after `position` ends, and how many it holds
    (`limit`: the stream may hold more): one range of the stream's index, as `event_stream.read` finds
    a page's edge. Every event up to that end is final, so later statements see the same range."""
    scanned = (
        select(Event.xact, Event.id)
        .where(_after(position), Event.xact < stream_horizon())
        .order_by(Event.xact, Event.id)
        .limit(limit)
        .subquery()
    )
    edge = connection.execute(
        select(scanned.c.xact, scanned.c.id, func.count().over().label("seen"))
        .order_by(scanned.c.xact.desc(), scanned.c.id.desc())
        .limit(1)
    ).first()
    if edge is None:
        return position, 0
    return Position(edge.xact, edge.id), edge.seen


def _counting_statement(connection: Connection, position: Position, end: Position, since: datetime | None) -> Any:
    """One statement counting the range's events (position, end] per dimension key and hour: a row per
    (dimension, k1, k2, k3, hour) with a sum per metric of _SQL_METRICS. Keys are raw (an address's
    domain part, a link's url and number as JSON text): `_counters` turns them into values."""
    sql = rollup_sql.for_bind(connection)
    json = json_attributes.for_bind(connection)
    props = Event.properties
    human = Event.machine.is_(False)
    kind = Event.type
    earlier = aliased(Event)
    first_click = and_(
        kind == EventType.CLICKED.value,
        human,
        Event.message_id.isnot(None),
        Event.message_id != "",
        ~select(literal(1))
        .where(
            earlier.message_id == Event.message_id,
            earlier.type == EventType.CLICKED.value,
            earlier.machine.is_(False),
            tuple_(earlier.xact, earlier.id) < tuple_(Event.xact, Event.id),
        )
        .exists(),
    )
    hard = json.attribute(props, "kind").equals("hard")
    unique = json.attribute(props, "unique").equals(True)
    flags = {
        **{metric: kind == name for name, metric in _PLAIN.items()},
        "bounced_hard": and_(kind == EventType.BOUNCED.value, hard),
        "bounced_soft": and_(kind == EventType.BOUNCED.value, ~hard),
        "opened_human": and_(kind == EventType.OPENED.value, human),
        "opened_machine": and_(kind == EventType.OPENED.value, ~human),
        "opened_unique_human": and_(kind == EventType.OPENED.value, human, unique),
        "clicked_human": and_(kind == EventType.CLICKED.value, human),
        "clicked_machine": and_(kind == EventType.CLICKED.value, ~human),
        "clicked_unique_human": and_(kind == EventType.CLICKED.value, human, unique),
        "clicked_messages_human": first_click,
    }
    filters = [_after(position), _upto(end), kind.in_(_COUNTED_TYPES)]
    goal = get_settings().analytics_conversion_event
    if goal is not None:  # goal events count in Python, by attribution (see `_count_goals`)
        filters.append(kind != goal)
    if since is not None:
        filters.append(Event.occurred_at >= since)
    # The contact's address only for an event without its message (CASE looks it up only then).
    email = select(Contact.email).where(Contact.id == Event.contact_id).scalar_subquery()
    address = case((Message.id.isnot(None), Message.recipient), else_=email)
    click = kind == EventType.CLICKED.value
    # Per event: its keys (a message's attributes, raw) and a 0/1 per metric.
    base = (
        select(
            Event.id.label("id"),
            Message.id.label("message_id"),
            Event.campaign_id.label("campaign_id"),
            Message.campaign_id.label("message_campaign_id"),
            Message.template_name.label("template_name"),
            Message.variant.label("variant"),
            cast(Message.tags, String).label("tags"),
            sql.domain_part(address).label("domain"),
            click.label("click"),
            case((click, sql.json_text(props, "url"))).label("url"),
            case((click, sql.json_text(props, "link"))).label("link"),
            sql.hour(Event.occurred_at).label("hour"),
            *(case((flags[metric], 1), else_=0).label(metric) for metric in _SQL_METRICS),
        )
        .select_from(Event)
        .outerjoin(Message, Message.id == Event.message_id)
        .where(*filters)
        .cte("counted")
    )
    # The events summed per combination of keys and hour (few rows), each dimension counted from it.
    keys = [base.c[name] for name in base.c.keys() if name not in ("id", "message_id", *_SQL_METRICS)]
    agg = (
        select(
            *keys,
            *(func.sum(base.c[metric]).label(metric) for metric in _SQL_METRICS),
            func.row_number().over().label("combination"),
        )
        .group_by(*keys)
        .cte("summed")
    )

    def text(value: Any) -> ColumnElement:
        return cast(value, String)

    def by(dimension: str, keys: list[Any], *where: Any, source: Any = None, table: Any = agg) -> Any:
        """The sums of `table` (or of `source`, a join on it) per `keys` and hour."""
        keys = [*keys, *[null()] * (3 - len(keys))]
        grouped = [key for key in keys if not isinstance(key, Null)]
        return (
            select(
                literal(dimension, String).label("dimension"),
                *(text(key).label(name) for key, name in zip(keys, _KEYS, strict=True)),
                table.c.hour,
                *(func.sum(table.c[metric]).label(metric) for metric in _SQL_METRICS),
            )
            .select_from(source if source is not None else table)
            .where(*where)
            .group_by(*grouped, table.c.hour)
        )

    # A message's tags each once (rows of one `tags` text hold the same array).
    elements = sql.array_elements(agg.c.tags)
    tags = (
        select(agg.c.combination, elements.c.value.label("tag"))
        .select_from(agg)
        .join(elements, true())
        .where(agg.c.tags.isnot(None))
        .distinct()
        .subquery("tags")
    )
    # An event's workflow steps each once (a message may have run a step twice): a join on
    # ix_workflow_step_runs_message_id, carrying the event's hour and metrics along.
    steps = (
        select(base.c.id, StepRun.workflow_id, StepRun.step, base.c.hour, *(base.c[m] for m in _SQL_METRICS))
        .select_from(base)
        .join(StepRun, StepRun.message_id == base.c.message_id)
        .distinct()
        .subquery("steps")
    )
    return union_all(
        by(ALL, []),
        by(CAMPAIGN, [agg.c.campaign_id], agg.c.campaign_id.isnot(None)),
        by(DOMAIN, [agg.c.domain], agg.c.domain.isnot(None)),
        by(TEMPLATE, [agg.c.template_name], agg.c.template_name.isnot(None), agg.c.template_name != ""),
        by(
            VARIANT,
            [agg.c.message_campaign_id, agg.c.variant],
            agg.c.message_campaign_id.isnot(None),
            agg.c.variant.isnot(None),
            agg.c.variant != "",
        ),
        by(TAG, [tags.c.tag], source=agg.join(tags, tags.c.combination == agg.c.combination)),
        by(STEP, [steps.c.workflow_id, steps.c.step], table=steps),
        by(LINK, [agg.c.campaign_id, agg.c.url, agg.c.link], agg.c.click, agg.c.campaign_id.isnot(None)),
    )


def _link_of(campaign_id: str, url: str | None, link: str | None) -> str:
    """`link_value` from the JSON text of the click's `url` and `link` (None: the property is absent)."""
    properties = {name: json.loads(found) for name, found in (("url", url), ("link", link)) if found is not None}
    return f"{campaign_id}/{properties.get('url') or '#' + str(properties.get('link', 0))}"


def _counters(rows: Iterable[Any], policy: Policy) -> Counter[Key]:
    """The counters of the counting statement's rows, in hour and day buckets."""
    counts: Counter[Key] = Counter()
    sites: dict[str, str] = {}
    for row in rows:
        dimension, hour = row.dimension, row.hour
        amounts = [(metric, n) for metric in _SQL_METRICS if (n := getattr(row, metric))]
        if dimension == DOMAIN:
            domain = domain_of("@" + row.k1)
            if domain is None:
                continue
            if domain not in sites:
                sites[domain] = site_of(domain, policy)
            values = [(DOMAIN, domain), (SITE, sites[domain])]
        elif dimension == LINK:
            values = [(LINK, _link_of(row.k1, row.k2, row.k3))]
            amounts = [(metric, n) for metric, n in amounts if metric in _LINK_METRICS]
        elif dimension in (STEP, VARIANT):
            values = [(dimension, f"{row.k1}/{row.k2}")]
        else:
            values = [(dimension, row.k1 if row.k1 is not None else "")]
        for granularity in GRANULARITIES:
            start = bucket_start(hour, granularity)
            for dimension_, value in values:
                for metric, n in amounts:
                    counts[(dimension_, value[:VALUE_LENGTH], granularity, start, metric)] += int(n)
    return counts


def _goal_events(
    connection: Connection, position: Position, end: Position, since: datetime | None
) -> list[dict[str, Any]]:
    """The range's goal events, in stream order, as `event_stream.read` gives events (goal events are few)."""
    goal = get_settings().analytics_conversion_event
    if goal is None:
        return []
    filters = [_after(position), _upto(end), Event.type == goal]
    if since is not None:
        filters.append(Event.occurred_at >= since)
    rows = connection.execute(
        select(*event_stream.COLUMNS)
        .outerjoin(Contact, Contact.id == Event.contact_id)
        .where(*filters)
        .order_by(Event.xact, Event.id)
    )
    return [event_stream.as_dict(row) for row in rows]


def _count_goals(
    connection: Connection, position: Position, end: Position, since: datetime | None, policy: Policy
) -> Counter[Key]:
    """The counters of the range's goal events, in Python as before: their attributions (conversions
    written), and their own metrics when not attributed and the goal is one of SmartMail's types."""
    events = _goal_events(connection, position, end, since)
    if not events:
        return Counter()
    attributions = _attribute(connection, events, since=since)
    ids = [event["message_id"] for event in events if event["message_id"]]
    messages = _message_values(connection, ids + [a.message_id for a in attributions.values()], policy)
    # Clicks of the range are all here when the goal is `clicked`: the earlier ones are before the range.
    clicked_before = _clicked_before(connection, events, position)
    return count(events, messages, clicked_before, attributions=attributions, policy=policy, since=since)


def _count_range(connection: Connection, position: Position, end: Position, since: datetime | None = None) -> None:
    """Add the counters of the events in (position, end] (from `since`'s day on, when given)."""
    if end <= position:
        return
    policy = get_policy()
    counts = _count_goals(connection, position, end, since, policy)
    counts.update(_counters(connection.execute(_counting_statement(connection, position, end, since)), policy))
    _add(connection, Counter({key: n for key, n in counts.items() if n}))


def _events_in(connection: Connection, position: Position, end: Position) -> int:
    return connection.execute(select(func.count()).select_from(Event).where(_after(position), _upto(end))).scalar_one()


@dataclass(frozen=True)
class RolledUp:
    events: int
    more: bool  # time was up with events left


def roll_up(*, max_seconds: float = 10.0, page_size: int = MAX_RANGE) -> RolledUp:
    """Count the stream's events after the checkpoint, up to `page_size` per transaction, adding their
    counters and moving the checkpoint together: a crash repeats nothing and loses nothing."""
    started, read = time.monotonic(), 0
    while True:
        with get_engine().begin() as connection:
            position = Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(START)))
            end, read_now = _range_end(connection, position, page_size)
            _count_range(connection, position, end)
            checkpoints.move(connection, CHECKPOINT, str(end))
        read += read_now
        if read_now < page_size:
            return RolledUp(read, False)
        if time.monotonic() - started >= max_seconds:
            return RolledUp(read, True)


def rebuild(since: datetime | None = None, *, page_size: int = MAX_RANGE) -> int:
    """Recompute the roll-ups from the raw events; the events read.

    Without `since`: delete every roll-up and move the checkpoint to the stream's start in one
    transaction, then count the whole stream again (readers see the numbers grow back meanwhile).
    With `since`: in one transaction, delete the buckets from the day holding `since` on and count
    again the events of those buckets up to the checkpoint, in ranges of `page_size` events (a late
    event may be anywhere in the stream; the checkpoint stays). The conversions go with the buckets
    of their goal events, so each message converts again by the same goal event."""
    if since is None:
        with get_engine().begin() as connection:
            checkpoints.lock(connection, CHECKPOINT, initial=str(START))
            connection.execute(delete(Rollup))
            connection.execute(delete(Conversion))
            checkpoints.move(connection, CHECKPOINT, str(START))
        return roll_up(max_seconds=math.inf, page_size=page_size).events
    start = bucket_start(since, DAY)
    read = 0
    with get_engine().begin() as connection:
        last = Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(START)))
        connection.execute(delete(Rollup).where(Rollup.bucket_start >= start))
        connection.execute(delete(Conversion).where(Conversion.converted_at >= start))
        position = START
        while position < last:
            end, seen = _range_end(connection, position, page_size)
            if end > last:  # events after the checkpoint: the next tick's
                end = last
                seen = _events_in(connection, position, end)
            _count_range(connection, position, end, start)
            read += seen
            if seen == 0:
                break
            position = end
    return read
