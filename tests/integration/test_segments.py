"""Segment rules on SQLite and PostgreSQL, checked against a brute-force Python filter over the same generated data."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from smartmail.audience import contacts, segments
from smartmail.audience.segments import InvalidSegment
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Contact, ContactList, Event, ListMembership, Message

CONTACTS = 600


def _attributes(rng: random.Random) -> dict:
    """Attributes of mixed types on purpose: the same name holds strings, numbers, booleans or nothing."""
    a = {}
    choice = rng.random()
    if choice < 0.5:
        a["plan"] = rng.choice(["free", "pro", "team", "Pro", "pro plus", "ÉLITE", "zeta"])
    elif choice < 0.6:
        a["plan"] = rng.choice([1, 2, True, None])
    if rng.random() < 0.8:
        a["age"] = rng.choice([rng.randrange(15, 80), rng.randrange(15, 80) + 0.5, "30", 30, 30.0, False])
    if rng.random() < 0.7:
        a["vip"] = rng.choice([True, False, "true", 1, 0])
    if rng.random() < 0.7:
        a["signup"] = f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
        if rng.random() < 0.3:
            a["signup"] += f"T{rng.randrange(24):02d}:00:00"
    if rng.random() < 0.6:
        a["tags"] = rng.sample(["news", "beta", "vip", "b2b", 7, True], rng.randrange(0, 4))
    if rng.random() < 0.5:
        a["name"] = rng.choice(["Ann", "anna", "Zoé", "zoe", "Bob", "bobby", "B", "a b", ""])
    if rng.random() < 0.2:
        a["nested"] = {"x": 1}
    if rng.random() < 0.2:
        a["first name"] = rng.choice(["Ann", "Bob"])
    return a


@pytest.fixture
def world(env):
    """Contacts, lists, memberships, events and sent messages, written straight to the tables."""
    rng = random.Random(1234)
    now = utcnow()
    people = []
    for i in range(CONTACTS):
        people.append(
            {
                "email": f"p{i}@example{i % 5}.org",
                "status": rng.choice(contacts.STATUSES + ("subscribed",) * 4),
                "attributes": _attributes(rng),
                "created_at": now - timedelta(days=rng.randrange(0, 90), hours=12),
                "updated_at": now,
            }
        )
    engine = get_engine()
    with engine.begin() as conn:
        conn.execute(insert(Contact), people)
        ids = dict(conn.execute(select(Contact.email, Contact.id)).all())
        for p in people:
            p["id"] = ids[p["email"]]
        lists = {}
        for name in ("news", "customers", "empty"):
            lists[name] = conn.execute(
                insert(ContactList).values(name=name, created_at=now).returning(ContactList.id)
            ).scalar()
        memberships = []
        for p in people:
            for name in ("news", "customers"):
                if rng.random() < 0.4:
                    memberships.append(
                        {
                            "list_id": lists[name],
                            "contact_id": p["id"],
                            "joined_at": now,
                            "status": rng.choice(["subscribed", "subscribed", "unsubscribed"]),
                        }
                    )
        conn.execute(insert(ListMembership), memberships)
        events = []
        for p in people:
            for _ in range(rng.randrange(0, 6)):
                events.append(
                    {
                        "type": rng.choice(["opened", "opened", "clicked", "order_placed", "signup"]),
                        "contact_id": p["id"],
                        "properties": {},
                        "occurred_at": now - timedelta(days=rng.randrange(0, 60), hours=12),
                    }
                )
        events.append({"type": "opened", "contact_id": None, "properties": {}, "occurred_at": now})  # anonymous
        conn.execute(insert(Event), events)
        messages = []
        for n, p in enumerate(rng.sample(people, 200)):
            local, _, domain = p["email"].partition("@")
            recipient = rng.choice([p["email"], f"Person {n} <{local.upper()}@{domain}>", f'"A <b>" <{p["email"]}>'])
            messages.append(
                {
                    "id": f"{n:026d}",
                    "state": rng.choice(["sent", "sent", "failed"]),
                    "sender": "s@example.com",
                    "recipient": recipient,
                    "subject": "s",
                    "text": "t",
                    "headers": {},
                    "tags": [],
                    "message_id_header": f"<{n}@example.com>",
                    "attempts": 1,
                    "created_at": now,
                    "finished_at": now - timedelta(days=rng.randrange(0, 30), hours=12),
                }
            )
        conn.execute(insert(Message), messages)
    membership = {
        (m["contact_id"], name)
        for name, list_id in lists.items()
        for m in memberships
        if m["list_id"] == list_id and m["status"] == "subscribed"
    }
    return {"people": people, "membership": membership, "events": events, "messages": messages, "now": now}


# --- the brute-force filter: the rule language's meaning, written plainly ---------------------------


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(v, target) -> bool:
    if isinstance(target, bool):
        return isinstance(v, bool) and v is target
    if _num(target):
        return _num(v) and v == target
    return isinstance(v, str) and v == target


def _attr(rule, attrs) -> bool:
    present = rule["attr"] in attrs and attrs[rule["attr"]] is not None
    v = attrs.get(rule["attr"])
    op, target = rule["op"], rule.get("value")
    if op == "exists":
        return present == (True if target is None else target)
    if op == "eq":
        return _same(v, target)
    if op == "ne":
        return not _same(v, target)
    if op == "in":
        return any(_same(v, t) for t in target)
    if op == "contains":
        if isinstance(v, list):
            return any(_same(x, target) for x in v)
        return isinstance(target, str) and isinstance(v, str) and target in v
    compare = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }[op]
    if _num(target) and rule.get("type") != "date":
        return _num(v) and compare(v, target)
    return isinstance(v, str) and compare(v, target)


def matches(rule, person, world) -> bool:
    now = world["now"]
    if "all" in rule:
        return all(matches(r, person, world) for r in rule["all"])
    if "any" in rule:
        return any(matches(r, person, world) for r in rule["any"])
    if "not" in rule:
        return not matches(rule["not"], person, world)
    if "attr" in rule:
        return _attr(rule, person["attributes"])
    if "status" in rule:
        wanted = rule["status"] if isinstance(rule["status"], list) else [rule["status"]]
        return person["status"] in wanted
    if "list" in rule:
        return (person["id"], rule["list"]) in world["membership"]
    if "created_within" in rule:
        return person["created_at"] >= now - timedelta(days=rule["created_within"])
    engagement = {"opened_within": "opened", "clicked_within": "clicked"}
    for key, type_ in engagement.items():
        if key in rule:
            since = now - timedelta(days=rule[key])
            return any(
                e["contact_id"] == person["id"] and e["type"] == type_ and e["occurred_at"] >= since
                for e in world["events"]
            )
    if "sent_within" in rule:
        since = now - timedelta(days=rule["sent_within"])
        return any(
            m["state"] in ("sent", "bounced")
            and m["finished_at"] >= since
            and m["recipient"].rpartition("<")[2].rstrip(">").lower() == person["email"]
            for m in world["messages"]
        )
    if "event" in rule:
        since = now - timedelta(days=rule["within"]) if rule.get("within") else None
        hits = sum(
            1
            for e in world["events"]
            if e["contact_id"] == person["id"]
            and e["type"] == rule["event"]
            and (since is None or e["occurred_at"] >= since)
        )
        return hits >= rule.get("min_count", 1)
    raise AssertionError(rule)


CASES = [
    {"attr": "plan", "op": "eq", "value": "pro"},
    {"attr": "plan", "op": "eq", "value": 1},
    {"attr": "plan", "op": "eq", "value": True},
    {"attr": "plan", "op": "ne", "value": "pro"},
    {"attr": "plan", "op": "in", "value": ["pro", "team", 2]},
    {"attr": "plan", "op": "contains", "value": "ro"},
    {"attr": "plan", "op": "gt", "value": "pro"},
    {"attr": "plan", "op": "lt", "value": "Z"},
    {"attr": "plan", "op": "gte", "value": "ÉLITE"},
    {"attr": "plan", "op": "exists"},
    {"attr": "plan", "op": "exists", "value": False},
    {"attr": "age", "op": "gt", "value": 40},
    {"attr": "age", "op": "lte", "value": 30},
    {"attr": "age", "op": "eq", "value": 30},
    {"attr": "age", "op": "eq", "value": "30"},
    {"attr": "age", "op": "lt", "value": 22.5},
    {"attr": "age", "op": "in", "value": [30, 31.5, False]},
    {"attr": "vip", "op": "eq", "value": True},
    {"attr": "vip", "op": "eq", "value": False},
    {"attr": "vip", "op": "ne", "value": True},
    {"attr": "vip", "op": "eq", "value": 1},
    {"attr": "signup", "op": "gt", "value": "2024-06-15", "type": "date"},
    {"attr": "signup", "op": "lt", "value": "2024-03-01T00:00:00", "type": "date"},
    {"attr": "signup", "op": "in", "value": ["2024-01-01", "2024-02-02"], "type": "date"},
    {"attr": "tags", "op": "contains", "value": "vip"},
    {"attr": "tags", "op": "contains", "value": 7},
    {"attr": "tags", "op": "contains", "value": True},
    {"attr": "tags", "op": "exists"},
    {"attr": "name", "op": "contains", "value": "b"},
    {"attr": "name", "op": "gte", "value": "a"},
    {"attr": "name", "op": "eq", "value": ""},
    {"attr": "name", "op": "lt", "value": "Zoé"},
    {"attr": "nested", "op": "exists"},
    {"attr": "first name", "op": "eq", "value": "Ann"},
    {"status": "subscribed"},
    {"status": ["bounced", "complained"]},
    {"list": "news"},
    {"list": "empty"},
    {"created_within": 30},
    {"opened_within": 10},
    {"clicked_within": 30},
    {"sent_within": 14},
    {"event": "order_placed"},
    {"event": "order_placed", "within": 20},
    {"event": "opened", "within": 45, "min_count": 2},
    {"event": "signup", "min_count": 3},
    {"not": {"list": "customers"}},
    {"not": {"opened_within": 30}},
    {"not": {"event": "order_placed", "min_count": 2}},
    {"all": [{"attr": "plan", "op": "eq", "value": "pro"}, {"list": "news"}, {"opened_within": 30}]},
    {"any": [{"attr": "vip", "op": "eq", "value": True}, {"clicked_within": 5}, {"status": "blocked"}]},
    {
        "all": [
            {
                "not": {
                    "any": [{"attr": "age", "op": "lt", "value": 30}, {"attr": "age", "op": "exists", "value": False}]
                }
            },
            {"any": [{"list": "customers"}, {"not": {"status": "subscribed"}}]},
            {"not": {"attr": "tags", "op": "contains", "value": "beta"}},
        ]
    },
]


def test_every_rule_selects_what_the_brute_force_filter_selects(world):
    engine = get_engine()
    for rule in CASES:
        with engine.connect() as conn:
            got = set(conn.scalars(segments.audience_query(rule)))
        expected = {p["id"] for p in world["people"] if matches(rule, p, world)}
        assert got == expected, (rule, sorted(got - expected)[:5], sorted(expected - got)[:5])
        assert segments.count(rule) == len(expected)
    # The cases are worth something only if they are neither empty nor everything.
    sizes = [sum(matches(rule, p, world) for p in world["people"]) for rule in CASES]
    assert sum(0 < s < CONTACTS for s in sizes) >= len(CASES) - 3, sizes


def test_saved_segments_count_preview_and_keyset_pages(world):
    rules = {"all": [{"list": "news"}, {"attr": "age", "op": "gt", "value": 30}]}
    saved = segments.save_segment("news over 30", rules)
    assert saved["rules"] == rules
    expected = sorted(p["id"] for p in world["people"] if matches(rules, p, world))
    assert segments.count("news over 30") == len(expected)
    assert [c["id"] for c in segments.preview("news over 30", limit=5)] == expected[:5]
    # How campaigns walk an audience: keyset pages on contact id.
    from smartmail.audience.segments import contacts_t

    pages, last = [], 0
    while True:
        query = segments.audience_query("news over 30", after=last).order_by(contacts_t.c.id).limit(7)
        with get_engine().connect() as conn:  # after the query: naming a saved segment reads it
            page = list(conn.scalars(query))
        if not page:
            break
        pages.extend(page)
        last = page[-1]
    assert pages == expected
    segments.save_segment("news over 30", {"list": "customers"})  # replaced
    assert [s["rules"] for s in segments.get_segments()] == [{"list": "customers"}]
    assert segments.delete_segment("news over 30") and segments.get_segments() == []


def test_a_keyset_bound_selects_the_same_contacts_above_it(world):
    """`after` is repeated inside the list and event subqueries (for PostgreSQL's merge joins): the
    answer must be the rule's contacts above the bound, negated rules included."""
    ids = sorted(p["id"] for p in world["people"])
    after = ids[len(ids) // 2]
    with get_engine().connect() as conn:
        for rule in CASES:
            got = set(conn.scalars(segments.audience_query(rule, after=after)))
            expected = {p["id"] for p in world["people"] if p["id"] > after and matches(rule, p, world)}
            assert got == expected, rule
    where = str(segments.compile_where({"not": {"list": "news"}}, get_engine(), after=after))
    assert "list_memberships.contact_id > " in where, where


BAD = [
    (
        {"all": [{"status": "subscribed"}, {"list": "news"}, {"attr": "age", "op": "eqq", "value": 1}]},
        "rules.all[2].op",
    ),
    ({"all": [{"list": "no-such-list"}]}, "rules.all[0].list"),
    ({"any": [{"not": {"list": "missing"}}]}, "rules.any[0].not.list"),
]


@pytest.mark.parametrize("rules,field", BAD, ids=[f for _, f in BAD])
def test_bad_rules_store_nothing(world, rules, field):
    with pytest.raises(InvalidSegment) as error:
        segments.save_segment("bad", rules)
    assert error.value.field == field, str(error.value)
    with pytest.raises(InvalidSegment):
        segments.count(rules)
    with get_engine().connect() as conn:
        assert conn.scalar(select(func.count()).select_from(segments.Segment)) == 0


def test_unknown_saved_segment_is_an_error(env):
    with pytest.raises(InvalidSegment) as error:
        segments.count("nope")
    assert error.value.field == "segment"
