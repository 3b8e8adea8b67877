"""Roll-ups on SQLite and PostgreSQL: equal to a direct count over raw events, tick after tick, crash and rebuild."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import delete, insert, select, text

from smartmail.analytics import kpis, rollups
from smartmail.analytics.kpis import campaign_counts
from smartmail.audience import event_stream
from smartmail.audience.event_stream import Position
from smartmail.store import dialect
from smartmail.store.engine import get_engine
from smartmail.store.models import Contact, Conversion, Enrolment, Event, Message, Rollup, StepRun, Workflow
from smartmail.workers.policy import get_policy
from tests.conftest import reset_caches, wait_for

DOMAINS = ("example.org", "Mail.Example.com", "gmail.com", "yahoo.co.uk", "hotmail.com")
CAMPAIGNS = (11, 12, 13, None)  # None: transactional mail
TEMPLATES = ("welcome", "digest", None)
TAGS = ("news", "promo", "vip")
CONTACTS = 60  # four messages each, one of each campaign (a contact gets a campaign once)
GOAL = "order_placed"
WINDOW_DAYS = 2
DAY0 = datetime(2026, 11, 20)
OLD_DIMENSIONS = {"all", "campaign", "domain"}
CONVERSION_METRICS = {"converted", "revenue_cents"}


@pytest.fixture
def env(env, monkeypatch):
    """Conversions on, a short window (the history spans days), contacts to attribute to, no conversions left."""
    monkeypatch.setenv("SMARTMAIL_ANALYTICS_CONVERSION_EVENT", GOAL)
    monkeypatch.setenv("SMARTMAIL_ANALYTICS_CONVERSION_DAYS", str(WINDOW_DAYS))
    reset_caches()
    with get_engine().begin() as connection:
        connection.execute(delete(Conversion))  # not among the tables the shared fixture clears
        connection.execute(insert(Contact), [{"id": n, "email": f"c{n}@example.net"} for n in range(1, CONTACTS + 1)])
        connection.execute(insert(Workflow), [{"id": 5, "name": "onboarding"}])
    return env


def settle() -> None:
    """Wait until every stored event is readable (the PostgreSQL stream stops below the oldest open transaction)."""
    with get_engine().connect() as connection:
        last = connection.execute(select(Event.xact, Event.id).order_by(Event.xact.desc(), Event.id.desc())).first()
    if last is not None:
        wait_for(lambda: event_stream.end() == Position(*last), timeout=30, message="the stream to reach its end")


def _messages(count: int, rng: random.Random, first: int = 0) -> list[dict]:
    rows = []
    for i in range(first, first + count):
        rows.append(
            {
                "id": f"m{i:025d}",
                "state": "sent",
                "sender": "news@example.com",
                "recipient": f"user{i}@{rng.choice(DOMAINS)}",
                "subject": "s",
                "text": "t",
                "headers": {},
                "tags": rng.sample(TAGS, rng.randrange(3)),
                "template_name": rng.choice(TEMPLATES),
                "message_id_header": f"<m{i}@example.com>",
                "attempts": 1,
                "created_at": DAY0,
                "campaign_id": CAMPAIGNS[i % 4],
                "contact_id": i // 4 + 1,
                "variant": rng.choice(("A", "B", None)) if i % 4 == 0 else None,
            }
        )
    with get_engine().begin() as connection:
        connection.execute(insert(Message), rows)
        steps = [row for row in rows if rng.random() < 0.2]
        for row in steps:
            enrolment = connection.execute(
                insert(Enrolment).returning(Enrolment.id),
                {
                    "workflow_id": 5,
                    "version": 1,
                    "contact_id": row["contact_id"],
                    "entry_key": row["id"],
                    "step": "end",
                    "due_at": DAY0,
                },
            ).scalar_one()
            connection.execute(
                insert(StepRun),
                {
                    "enrolment_id": enrolment,
                    "run": 1,
                    "workflow_id": 5,
                    "step": rng.choice(("intro", "nudge")),
                    "kind": "send",
                    "contact_id": row["contact_id"],
                    "message_id": row["id"],
                },
            )
    return rows


def _history(messages: list[dict], rng: random.Random, *, late: bool = False) -> list[dict]:
    """A few events per message: sends, deferrals, failures, bounces, human and machine opens and clicks
    (the first of each kind marked unique, as engagement.py does), unsubscribes, complaints, a custom
    event. `late`: events whose occurred_at is days before they are written."""
    events = []
    for message in messages:
        at = DAY0 + timedelta(hours=rng.randrange(72), minutes=rng.randrange(60))
        if late:
            at -= timedelta(days=rng.randrange(1, 4))

        def add(
            event_type: str, machine: bool = False, message: dict = message, at: datetime = at, **properties
        ) -> None:
            events.append(
                {
                    "type": event_type,
                    "message_id": message["id"],
                    "campaign_id": message["campaign_id"],
                    "contact_id": message["contact_id"],
                    "machine": machine,
                    "properties": properties,
                    "occurred_at": at + timedelta(minutes=len(events) % 50),
                }
            )

        roll = rng.random()
        if roll < 0.1:
            add("deferred")
        if roll < 0.15:
            add("failed")
            continue
        add("sent")
        if rng.random() < 0.1:
            add("bounced", kind=rng.choice(("hard", "soft")))
        if rng.random() < 0.3:
            add("opened", machine=True, unique=True)
        opens = rng.randrange(3)
        for n in range(opens):
            add("opened", unique=n == 0 and not late)
        if opens or rng.random() < 0.2:
            for n in range(rng.randrange(3)):
                link = 1 + n % 2
                add("clicked", machine=rng.random() < 0.3, link=link, url=f"https://shop.example/{link}", unique=n < 2)
        if rng.random() < 0.05:
            add("unsubscribed")
        if rng.random() < 0.03:
            add("complained")
        if rng.random() < 0.1:  # some in the window after a click, some outside, some before any click
            at += timedelta(hours=rng.randrange(-24, 24 * (WINDOW_DAYS + 2)))
            add(GOAL, at=at, amount=rng.choice((10, "12.50", None, 7.25)))
    rng.shuffle(events)  # stream order is not time order
    with get_engine().begin() as connection:
        for start in range(0, len(events), 37):  # several transactions: several xacts on PostgreSQL
            connection.execute(insert(Event), events[start : start + 37])
    settle()
    return events


def _stored() -> dict[tuple, int]:
    with get_engine().connect() as connection:
        rows = connection.execute(select(*Rollup.__table__.c)).all()
    return {(r.dimension, r.value, r.granularity, r.bucket_start, r.metric): r.count for r in rows}


def _conditions(postgres: bool) -> dict[str, str]:
    prop = (
        (lambda name: f"(e.properties->>'{name}')")
        if postgres
        else (lambda name: f"json_extract(e.properties, '$.{name}')")
    )
    true = "'true'" if postgres else "1"
    human = "e.machine = false" if postgres else "e.machine = 0"
    machine = "e.machine = true" if postgres else "e.machine = 1"
    earlier_click = (
        "exists (select 1 from events f where f.message_id = e.message_id and f.type = 'clicked' and "
        f"{human.replace('e.', 'f.')} and (f.xact < e.xact or (f.xact = e.xact and f.id < e.id)))"
    )
    return {
        "sent": "e.type = 'sent'",
        "deferred": "e.type = 'deferred'",
        "failed": "e.type = 'failed'",
        "bounced_hard": f"e.type = 'bounced' and {prop('kind')} = 'hard'",
        "bounced_soft": f"e.type = 'bounced' and {prop('kind')} = 'soft'",
        "opened_human": f"e.type = 'opened' and {human}",
        "opened_machine": f"e.type = 'opened' and {machine}",
        "opened_unique_human": f"e.type = 'opened' and {human} and {prop('unique')} = {true}",
        "clicked_human": f"e.type = 'clicked' and {human}",
        "clicked_machine": f"e.type = 'clicked' and {machine}",
        "clicked_unique_human": f"e.type = 'clicked' and {human} and {prop('unique')} = {true}",
        "clicked_messages_human": f"e.type = 'clicked' and {human} and not {earlier_click}",
        "unsubscribed": "e.type = 'unsubscribed'",
        "complained": "e.type = 'complained'",
    }


def _direct() -> dict[tuple, int]:
    """Every (dimension, value, granularity, bucket, metric) counted with one GROUP BY over raw events."""
    engine = get_engine()
    postgres = dialect.is_postgresql(engine)
    if postgres:
        buckets = {"hour": "date_trunc('hour', e.occurred_at)", "day": "date_trunc('day', e.occurred_at)"}
        domain = "lower(split_part(m.recipient, '@', 2))"
    else:
        buckets = {
            "hour": "strftime('%Y-%m-%d %H:00:00', e.occurred_at)",
            "day": "strftime('%Y-%m-%d 00:00:00', e.occurred_at)",
        }
        domain = "lower(substr(m.recipient, instr(m.recipient, '@') + 1))"
    values = {"all": "''", "campaign": "cast(e.campaign_id as varchar)", "domain": domain}
    found: dict[tuple, int] = {}
    with engine.connect() as connection:
        for metric, condition in _conditions(postgres).items():
            for dimension, value in values.items():
                for granularity, bucket in buckets.items():
                    where = condition + (" and e.campaign_id is not null" if dimension == "campaign" else "")
                    rows = connection.execute(
                        text(
                            f"select {value} as v, {bucket} as b, count(*) as n from events e "
                            f"left join messages m on m.id = e.message_id where {where} group by v, b"
                        )
                    )
                    for v, b, n in rows:
                        start = b if isinstance(b, datetime) else datetime.fromisoformat(b)
                        found[(dimension, str(v), granularity, start, metric)] = n
    return found


def _old(stored: dict[tuple, int]) -> dict[tuple, int]:
    """The counters the SQL count covers: the first dimensions, events counted by their own type."""
    return {key: n for key, n in stored.items() if key[0] in OLD_DIMENSIONS and key[4] not in CONVERSION_METRICS}


def _cents(amount) -> int:
    return 0 if amount is None else int(Decimal(str(amount)) * 100)  # the generated amounts have whole cents


def _expected() -> dict[tuple, int]:
    """Every counter, the new dimensions and conversions included, counted in Python over the raw rows
    read in stream order: messages, step runs and events, attributing each goal event by a scan of
    the clicks before it (not the indexed query the roll-up makes)."""
    policy = get_policy()
    with get_engine().connect() as connection:
        events = connection.execute(select(Event).order_by(Event.xact, Event.id)).mappings().all()
        messages = {row.id: row for row in connection.execute(select(Message))}
        steps = {row.message_id: f"{row.workflow_id}/{row.step}" for row in connection.execute(select(StepRun))}
    found: Counter = Counter()
    clicked, converted, clicks = set(), set(), []
    plain = {"sent", "deferred", "failed", "unsubscribed", "complained"}
    for event in events:
        kind, props, at = event["type"], event["properties"] or {}, event["occurred_at"]
        amounts, message_id, campaign_id, link = {}, event["message_id"], event["campaign_id"], None
        if kind in plain:
            amounts[kind] = 1
        elif kind == "bounced":
            amounts["bounced_" + props["kind"]] = 1
        elif kind in ("opened", "clicked"):
            amounts[f"{kind}_{'machine' if event['machine'] else 'human'}"] = 1
            if not event["machine"] and props.get("unique") is True:
                amounts[f"{kind}_unique_human"] = 1
            if kind == "clicked" and not event["machine"]:
                clicks.append(event)
                if message_id not in clicked:
                    clicked.add(message_id)
                    amounts["clicked_messages_human"] = 1
            if kind == "clicked" and campaign_id is not None:
                link = f"{campaign_id}/{props['url']}"
        elif kind == GOAL:
            window = [
                c
                for c in clicks
                if c["contact_id"] == event["contact_id"] and at - timedelta(days=WINDOW_DAYS) <= c["occurred_at"] <= at
            ]
            if not window:
                continue
            click = max(window, key=lambda c: (c["occurred_at"], c["xact"], c["id"]))
            message_id, campaign_id = click["message_id"], click["campaign_id"]
            amounts["revenue_cents"] = _cents(props.get("amount"))
            if message_id not in converted:
                converted.add(message_id)
                amounts["converted"] = 1
        values = [("all", "")] + ([("campaign", str(campaign_id))] if campaign_id is not None else [])
        message = messages[message_id]
        domain = message.recipient.rsplit("@", 1)[1].lower()
        site = policy.site_for_domain(domain)
        values += [("domain", domain), ("site", site.name if site else domain)]
        values += [("tag", tag) for tag in message.tags]
        if message.template_name:
            values.append(("template", message.template_name))
        if message.variant:
            values.append(("variant", f"{message.campaign_id}/{message.variant}"))
        if message_id in steps:
            values.append(("workflow_step", steps[message_id]))
        for granularity in ("hour", "day"):
            start = rollups.bucket_start(at, granularity)
            for dimension, value in values:
                for metric, n in amounts.items():
                    found[(dimension, value, granularity, start, metric)] += n
            for metric in {"clicked_human", "clicked_machine", "clicked_unique_human"} & set(amounts) if link else ():
                found[("link", link, granularity, start, metric)] += 1
    return {key: n for key, n in found.items() if n}


@pytest.fixture
def rng() -> random.Random:
    return random.Random(23)


def test_roll_ups_equal_a_direct_count_tick_after_tick(env, rng):
    first = _messages(120, rng)
    _history(first, rng)
    assert rollups.roll_up(page_size=7).events > 7  # many pages
    assert _old(_stored()) == _direct()
    assert _stored() == _expected()
    assert {key[0] for key in _stored()} == set(rollups.DIMENSIONS)
    assert {key[4] for key in _stored()} == set(rollups.METRICS)  # the history has every kind
    assert ("domain", "mail.example.com") in {key[:2] for key in _stored()}

    # Late events (old occurred_at, written now) on old and new messages land in their old buckets,
    # and a click on a message clicked in an earlier tick is not its first.
    _history(first[:40] + _messages(30, rng, first=120), rng, late=True)
    before = _stored()
    rollups.roll_up(page_size=5)
    after = _stored()
    assert _old(after) == _direct()
    assert after == _expected()
    assert any(key[3] < DAY0 and key not in before for key in after)

    # A tick repeated finds nothing new and changes nothing.
    assert rollups.roll_up(page_size=5) == rollups.RolledUp(0, False)
    assert _stored() == after


def test_a_tick_that_crashes_midway_repeats_nothing(env, rng, monkeypatch):
    _history(_messages(80, rng), rng)
    rollups.roll_up(page_size=9)
    _history(_messages(60, rng, first=80), rng)
    committed = _stored()
    calls = []
    real_move = rollups.checkpoints.move

    def crash_on_third_page(connection, name, position):
        calls.append(position)
        if len(calls) == 3:  # the page's counters are written; its transaction must roll back
            raise RuntimeError("worker lost")
        real_move(connection, name, position)

    monkeypatch.setattr(rollups.checkpoints, "move", crash_on_third_page)
    with pytest.raises(RuntimeError):
        rollups.roll_up(page_size=9)
    monkeypatch.setattr(rollups.checkpoints, "move", real_move)
    assert _stored() != committed  # two pages were committed before the crash
    rollups.roll_up(page_size=9)
    assert _old(_stored()) == _direct()
    assert _stored() == _expected()


def test_rebuild_gives_the_same_numbers(env, rng):
    messages = _messages(100, rng)
    _history(messages, rng)
    _history(messages[:30], rng, late=True)
    rollups.roll_up(page_size=11)
    expected = _expected()
    assert _old(expected) == _direct()
    assert _stored() == expected
    campaign = campaign_counts(11)

    with get_engine().begin() as connection:  # a counter gone wrong is put right by a rebuild
        connection.execute(Rollup.__table__.update().values(count=Rollup.count + 5))
    assert rollups.rebuild(page_size=13) > 0
    assert _stored() == expected
    assert campaign_counts(11) == campaign

    since = DAY0 + timedelta(days=1, hours=5)
    with get_engine().begin() as connection:
        connection.execute(Rollup.__table__.update().where(Rollup.bucket_start >= DAY0).values(count=0))
    rollups.rebuild(since, page_size=13)
    assert {key: n for key, n in _stored().items() if key[3] >= DAY0 + timedelta(days=1)} == {
        key: n for key, n in expected.items() if key[3] >= DAY0 + timedelta(days=1)
    }
    # Buckets before the day of `since` are left as they were.
    assert all(n == 0 for key, n in _stored().items() if DAY0 <= key[3] < DAY0 + timedelta(days=1))


def _write(events: list[dict]) -> None:
    with get_engine().begin() as connection:
        for event in events:  # one at a time: the stream's order is the list's
            connection.execute(insert(Event), [event])
    settle()


def _event(kind: str, message: dict, at: datetime, *, machine: bool = False, **properties) -> dict:
    return {
        "type": kind,
        "message_id": message["id"] if kind != GOAL else None,
        "campaign_id": message["campaign_id"] if kind != GOAL else None,
        "contact_id": message["contact_id"],
        "machine": machine,
        "properties": properties,
        "occurred_at": at,
    }


def test_conversions_once_per_clicked_message_within_the_window_and_period_kpis(env, rng):
    messages = _messages(12, rng)  # contacts 1, 2, 3: four messages each, campaigns 11, 12, 13, None
    a, b, scanned, late = messages[0], messages[1], messages[4], messages[8]
    t = DAY0 + timedelta(hours=10)
    _write(
        [_event("sent", m, DAY0) for m in messages]
        + [
            _event(GOAL, a, t - timedelta(hours=1), amount=99),  # before any click: not attributed
            _event("clicked", a, t, link=1, url="https://shop.example/a", unique=True),
            _event("clicked", b, t + timedelta(hours=2), link=1, url="https://shop.example/b", unique=True),
            _event(GOAL, b, t + timedelta(days=1), amount="12.50"),  # b, the latest click, converts
            _event(GOAL, b, t + timedelta(days=1, hours=1), amount=5),  # b again: revenue, not a conversion
            _event(GOAL, b, t + timedelta(days=WINDOW_DAYS, hours=3)),  # outside the window: nothing
            _event("clicked", scanned, t, machine=True, link=1, url="https://shop.example/s", unique=True),
            _event(GOAL, scanned, t + timedelta(hours=1), amount=7),  # a scanner's click converts nothing
            _event("clicked", late, t + timedelta(days=1), link=1, url="https://shop.example/l", unique=True),
            _event(GOAL, late, t, amount=3),  # written after the click but before it in time: nothing
        ]
    )
    rollups.roll_up(page_size=4)
    stored = _stored()
    assert stored == _expected()
    day1 = DAY0 + timedelta(days=1)
    converted = {key: n for key, n in stored.items() if key[4] in CONVERSION_METRICS and key[2] == "day"}
    assert converted[("campaign", str(b["campaign_id"]), "day", day1, "converted")] == 1
    assert converted[("campaign", str(b["campaign_id"]), "day", day1, "revenue_cents")] == 1750
    assert converted[("all", "", "day", day1, "revenue_cents")] == 1750
    assert not any(
        key[1] in (str(a["campaign_id"]), str(scanned["campaign_id"])) for key in converted if key[0] == "campaign"
    )
    assert stored[("link", f"{a['campaign_id']}/https://shop.example/a", "day", DAY0, "clicked_unique_human")] == 1
    with get_engine().connect() as connection:
        assert connection.execute(select(Conversion.message_id)).scalars().all() == [b["id"]]

    # Repeated ticks, and a rebuild, find the same conversions.
    assert rollups.roll_up() == rollups.RolledUp(0, False)
    rollups.rebuild(page_size=3)
    assert _stored() == stored
    rollups.rebuild(day1, page_size=3)
    assert _stored() == stored

    campaign = kpis.campaign_kpis(b["campaign_id"])
    assert campaign["revenue_cents"] == 1750
    assert (campaign["kpis"]["conversion_rate"]["numerator"], campaign["kpis"]["conversion_rate"]["denominator"]) == (
        1,
        3,
    )

    series = kpis.period_kpis(DAY0 - timedelta(days=1), DAY0 + timedelta(days=3), "day")
    assert [item["bucket_start"] for item in series] == [DAY0 + timedelta(days=n) for n in range(-1, 3)]
    assert series[0]["counts"] == {} and series[0]["kpis"]["open_rate"]["value"] is None  # a bucket without events
    assert series[1]["counts"]["sent"] == 12 and series[1]["kpis"]["click_through_rate"]["numerator"] == 2
    assert series[1]["kpis"]["conversion_rate"]["value"] == 0
    assert (
        series[2]["revenue_cents"] == 1750 and series[2]["kpis"]["conversion_rate"]["value"] is None
    )  # no sends that day
    hours = kpis.period_kpis(t, t + timedelta(minutes=150), "hour", "campaign", str(b["campaign_id"]))
    assert [item["counts"] for item in hours] == [
        {},
        {},
        {"clicked_human": 1, "clicked_unique_human": 1, "clicked_messages_human": 1},
    ]


def test_a_tick_counts_at_most_its_range_cap_and_the_next_tick_the_rest(env, rng):
    _history(_messages(40, rng), rng)
    rollups.roll_up()
    committed = _stored()
    new = _history(_messages(50, rng, first=40), rng)
    cap = len(new) // 2 + 1  # more new events than one range holds: two ticks needed
    with get_engine().connect() as connection:
        start = Position.parse(
            connection.execute(text("SELECT position FROM stream_checkpoints WHERE name = 'analytics'")).scalar_one()
        )
        rows = connection.execute(select(Event.xact, Event.id).order_by(Event.xact, Event.id)).all()
    after = [Position(*row) for row in rows if Position(*row) > start]  # the new events, in stream order
    assert len(after) == len(new)

    assert rollups.roll_up(max_seconds=0, page_size=cap) == rollups.RolledUp(cap, True)
    with get_engine().connect() as connection:
        checkpoint = connection.execute(
            text("SELECT position FROM stream_checkpoints WHERE name = 'analytics'")
        ).scalar_one()
    assert Position.parse(checkpoint) == after[cap - 1]  # the cap-th new event: the range's end
    partial = _stored()
    assert partial != committed and partial != _expected()

    assert rollups.roll_up(max_seconds=0, page_size=cap) == rollups.RolledUp(len(new) - cap, False)
    assert _old(_stored()) == _direct()
    assert _stored() == _expected()
    assert rollups.roll_up(page_size=cap) == rollups.RolledUp(0, False)
