"""Segments: a JSON rule language checked with field paths and compiled to one SQL query over contacts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, false, func, not_, or_, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from smartmail.audience.contacts import STATUSES, InvalidInput, as_dict, check_attribute_name
from smartmail.audience.engagement_decay import Decay
from smartmail.errors import InvalidSegment, NotFound
from smartmail.store.engine import get_engine, reader, session_scope, utcnow
from smartmail.store.models import Contact, ContactList, Event, EventType, ListMembership, Message, Segment
from smartmail.store.sql import json_attributes
from smartmail.store.sql.json_attributes import JsonAttributes, guard

OPERATORS = ("eq", "ne", "in", "contains", "gt", "gte", "lt", "lte", "exists")
ENGAGEMENT = {"opened_within": EventType.OPENED.value, "clicked_within": EventType.CLICKED.value}
_MAX_DEPTH = 16
_MAX_RULES = 500
_MAX_DAYS = 36500

contacts_t = Contact.__table__
events_t = Event.__table__
members_t = ListMembership.__table__
lists_t = ContactList.__table__
messages_t = Message.__table__


# --- Parsing: JSON → a small checked tree -----------------------------------------------------------


@dataclass(frozen=True)
class Attr:
    name: str
    op: str
    value: Any
    is_date: bool


@dataclass(frozen=True)
class Group:
    kind: str  # all | any
    rules: tuple


@dataclass(frozen=True)
class Not:
    rule: Any


@dataclass(frozen=True)
class Simple:
    kind: str  # status | list | created_within | opened_within | clicked_within | sent_within
    value: Any
    path: str = ""


@dataclass(frozen=True)
class EventRule:
    name: str
    within: int | None
    min_count: int


@dataclass(frozen=True)
class ScoreRule:
    """`{"engagement_score": {"gte": 5, "lt": 20}}`: the contact's current score against each bound."""

    bounds: tuple[tuple[str, float], ...]  # (gt | gte | lt | lte, value ≥ 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, bool)) or _is_number(value)


def _days(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_DAYS:
        raise InvalidSegment(f"must be a whole number of days from 1 to {_MAX_DAYS}, not {value!r}", field=path)
    return value


def _iso(value: Any, path: str) -> str:
    """A date rule's value as the ISO text dates are stored as (see imports.convert)."""
    if isinstance(value, str):
        try:
            if len(value.strip()) == 10:
                return date.fromisoformat(value.strip()).isoformat()
            moment = datetime.fromisoformat(value.strip())
            if moment.tzinfo is not None:
                raise InvalidSegment("give a naive UTC time (no offset)", field=path)
            return moment.isoformat(timespec="seconds")
        except ValueError:
            pass
    raise InvalidSegment(f"{value!r} is not an ISO 8601 date such as 2024-05-01", field=path)


def parse(rules: Any, path: str = "rules") -> Any:
    """Check a rule tree; InvalidSegment names the first bad rule by its path."""
    counter = [0]
    tree = _parse(rules, path, 0, counter)
    _refuse_nul(rules, path)
    return tree


def _refuse_nul(value: Any, path: str) -> None:
    # Every string of a rule can end up a SQL parameter, and PostgreSQL refuses NUL in text.
    if isinstance(value, str) and "\x00" in value:
        raise InvalidSegment("must not contain NUL characters", field=path)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_nul(key, path)
            _refuse_nul(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_nul(item, f"{path}[{i}]")


def _parse(rule: Any, path: str, depth: int, counter: list[int]) -> Any:
    counter[0] += 1
    if counter[0] > _MAX_RULES:
        raise InvalidSegment(f"more than {_MAX_RULES} rules", field=path)
    if depth > _MAX_DEPTH:
        raise InvalidSegment(f"rules nest deeper than {_MAX_DEPTH} levels", field=path)
    if not isinstance(rule, Mapping):
        raise InvalidSegment("a rule must be a JSON object", field=path)
    for kind in ("all", "any"):
        if kind in rule:
            _only(rule, {kind}, path)
            items = rule[kind]
            if not isinstance(items, list) or not items:
                raise InvalidSegment("must be a non-empty list of rules", field=f"{path}.{kind}")
            return Group(kind, tuple(_parse(r, f"{path}.{kind}[{i}]", depth + 1, counter) for i, r in enumerate(items)))
    if "not" in rule:
        _only(rule, {"not"}, path)
        return Not(_parse(rule["not"], f"{path}.not", depth + 1, counter))
    if "attr" in rule:
        return _parse_attr(rule, path)
    if "status" in rule:
        _only(rule, {"status"}, path)
        values = rule["status"] if isinstance(rule["status"], list) else [rule["status"]]
        for i, value in enumerate(values):
            if value not in STATUSES:
                raise InvalidSegment(
                    f"{value!r} is not one of {', '.join(STATUSES)}",
                    field=f"{path}.status" + (f"[{i}]" if isinstance(rule["status"], list) else ""),
                )
        if not values:
            raise InvalidSegment("must name at least one status", field=f"{path}.status")
        return Simple("status", tuple(values))
    if "list" in rule:
        _only(rule, {"list"}, path)
        if not isinstance(rule["list"], str) or not rule["list"]:
            raise InvalidSegment("must be a list name", field=f"{path}.list")
        return Simple("list", rule["list"], f"{path}.list")
    for kind in ("created_within", "opened_within", "clicked_within", "sent_within"):
        if kind in rule:
            _only(rule, {kind}, path)
            return Simple(kind, _days(rule[kind], f"{path}.{kind}"))
    if "event" in rule:
        return _parse_event(rule, path)
    if "engagement_score" in rule:
        _only(rule, {"engagement_score"}, path)
        return _parse_score(rule["engagement_score"], f"{path}.engagement_score")
    keys = ", ".join(repr(k) for k in rule) or "nothing"
    raise InvalidSegment(
        f"unknown rule ({keys}); expected one of all, any, not, attr, status, list, "
        "created_within, opened_within, clicked_within, sent_within, event, engagement_score",
        field=path,
    )


def _parse_event(rule: Mapping, path: str) -> EventRule:
    _only(rule, {"event", "within", "min_count"}, path)
    name = rule["event"]
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise InvalidSegment("must be an event name", field=f"{path}.event")
    within = _days(rule["within"], f"{path}.within") if rule.get("within") is not None else None
    min_count = rule.get("min_count", 1)
    if not isinstance(min_count, int) or isinstance(min_count, bool) or not 1 <= min_count <= 1_000_000:
        raise InvalidSegment(f"must be a whole number from 1, not {min_count!r}", field=f"{path}.min_count")
    return EventRule(name, within, min_count)


_SCORE_OPERATORS = ("gt", "gte", "lt", "lte")


def _parse_score(bounds: Any, path: str) -> ScoreRule:
    if not isinstance(bounds, Mapping) or not bounds:
        raise InvalidSegment(
            'must be an object of one or more of gt, gte, lt, lte and a number, e.g. {"gte": 5}', field=path
        )
    checked = []
    for op, value in bounds.items():
        if op not in _SCORE_OPERATORS:
            raise InvalidSegment(
                f"unknown operator {op!r}; expected one of {', '.join(_SCORE_OPERATORS)}", field=f"{path}.{op}"
            )
        if not _is_number(value) or value < 0:
            raise InvalidSegment(
                f"must be a number from 0 (scores are never negative), not {value!r}", field=f"{path}.{op}"
            )
        checked.append((op, float(value)))
    return ScoreRule(tuple(checked))


def _only(rule: Mapping, allowed: set[str], path: str) -> None:
    extra = [k for k in rule if k not in allowed]
    if extra:
        raise InvalidSegment(f"unexpected key {extra[0]!r} in this rule", field=f"{path}.{extra[0]}")


def _parse_attr(rule: Mapping, path: str) -> Attr:
    _only(rule, {"attr", "op", "value", "type"}, path)
    try:
        name = check_attribute_name(rule["attr"], field=f"{path}.attr")
    except InvalidInput as exc:
        raise InvalidSegment(exc.reason, field=exc.field) from None
    op = rule.get("op")
    if op not in OPERATORS:
        raise InvalidSegment(f"unknown operator {op!r}; expected one of {', '.join(OPERATORS)}", field=f"{path}.op")
    kind = rule.get("type")
    if kind not in (None, "date"):
        raise InvalidSegment(f"unknown type {kind!r}; only 'date' can be given", field=f"{path}.type")
    value = rule.get("value")
    vpath = f"{path}.value"
    if op == "exists":
        if value is None:
            value = True
        if not isinstance(value, bool):
            raise InvalidSegment("exists takes true or false", field=vpath)
        return Attr(name, op, value, False)
    if "value" not in rule:
        raise InvalidSegment(f"{op} needs a value", field=vpath)
    if op == "in":
        if not isinstance(value, list) or not value or not all(_is_scalar(v) for v in value):
            raise InvalidSegment("in takes a non-empty list of strings, numbers or booleans", field=vpath)
        if kind == "date":
            value = [_iso(v, f"{vpath}[{i}]") for i, v in enumerate(value)]
        return Attr(name, op, tuple(value), kind == "date")
    if not _is_scalar(value):
        raise InvalidSegment(f"{op} takes a string, a number or a boolean, not {json.dumps(value)}", field=vpath)
    if kind == "date":
        value = _iso(value, vpath)
    if op in ("gt", "gte", "lt", "lte") and isinstance(value, bool):
        raise InvalidSegment(f"{op} compares numbers, strings or dates, not booleans", field=vpath)
    return Attr(name, op, value, kind == "date")


# --- Compiling: the tree → one WHERE clause over contacts ------------------------------------------

_COMPARE = {"gt": "__gt__", "gte": "__ge__", "lt": "__lt__", "lte": "__le__"}


def _attr_clause(rule: Attr, sql: JsonAttributes) -> ColumnElement:
    j = sql.attribute(contacts_t.c.attributes, rule.name)
    if rule.op == "exists":
        return j.exists() if rule.value else not_(j.exists())
    if rule.op == "eq":
        return j.equals(rule.value)
    if rule.op == "ne":
        return not_(j.equals(rule.value))
    if rule.op == "in":
        return or_(*[j.equals(v) for v in rule.value])
    if rule.op == "contains":
        array = guard(j.is_array(), j.array_contains(rule.value))
        if isinstance(rule.value, str):
            return or_(guard(j.is_string(), j.position(rule.value) > 0), array)
        return array
    method = _COMPARE[rule.op]
    if _is_number(rule.value) and not rule.is_date:
        return guard(j.is_number(), getattr(j.number(), method)(rule.value))
    return guard(j.is_string(), getattr(j.string(), method)(rule.value))


def _of_contact(column, after: int | None) -> list[ColumnElement]:
    """A subquery's rows of the outer query's contact; with a keyset bound (the outer query has
    `contacts.id > after`), the same bound on this side too: PostgreSQL carries equalities, not
    inequalities, across a join, and without it its merge join reads every list membership below
    a fan-out page before the page's own, more with each page."""
    return [column == contacts_t.c.id, *([column > after] if after is not None else [])]


def _events_since(type_: str, since: datetime | None):
    # Human events only: privacy-proxy opens and scanner clicks say nothing of the contact. (Custom
    # events are never machine ones; the test keeps the whole index prefix in use for them too.)
    conditions = [events_t.c.type == type_, events_t.c.machine.is_(false()), events_t.c.contact_id.is_not(None)]
    if since is not None:
        conditions.append(events_t.c.occurred_at >= since)
    return conditions


def _score_clause(op: str, value: float, now: datetime) -> ColumnElement:
    """One bound on the current score as a comparison of the stored key (engagement_score.Decay):
    score ≥ X ⇔ key ≥ key(X, now). A contact without a key has the score 0; the NULL tests keep the
    clause true or false, never NULL, so that `not` selects exactly the others."""
    key = contacts_t.c.engagement_key
    if value == 0:
        return {"gte": true(), "gt": key.is_not(None), "lte": key.is_(None), "lt": false()}[op]
    compared = getattr(key, _COMPARE[op])(Decay.from_settings().key(value, now))
    return and_(key.is_not(None), compared) if op in ("gt", "gte") else or_(key.is_(None), compared)


def _clause(node: Any, sql: JsonAttributes, now: datetime, after: int | None) -> ColumnElement:
    if isinstance(node, Group):
        parts = [_clause(r, sql, now, after) for r in node.rules]
        return and_(*parts) if node.kind == "all" else or_(*parts)
    if isinstance(node, Not):
        return not_(_clause(node.rule, sql, now, after))
    if isinstance(node, Attr):
        return _attr_clause(node, sql)
    if isinstance(node, ScoreRule):
        return and_(*[_score_clause(op, value, now) for op, value in node.bounds])
    if isinstance(node, EventRule):
        since = now - timedelta(days=node.within) if node.within else None
        if node.min_count == 1:
            return exists().where(*_of_contact(events_t.c.contact_id, after), *_events_since(node.name, since))
        counted = (
            select(events_t.c.contact_id)
            .where(*_events_since(node.name, since))
            .group_by(events_t.c.contact_id)
            .having(func.count() >= node.min_count)
        )
        return contacts_t.c.id.in_(counted)
    kind, value = node.kind, node.value
    if kind == "status":
        return contacts_t.c.status.in_(value)
    if kind == "list":
        return exists().where(
            *_of_contact(members_t.c.contact_id, after),
            members_t.c.status == "subscribed",
            members_t.c.list_id == select(lists_t.c.id).where(lists_t.c.name == value).scalar_subquery(),
        )
    since = now - timedelta(days=value)
    if kind == "created_within":
        return contacts_t.c.created_at >= since
    if kind in ENGAGEMENT:
        return exists().where(*_of_contact(events_t.c.contact_id, after), *_events_since(ENGAGEMENT[kind], since))
    if kind == "sent_within":
        sent = select(sql.recipient_address(messages_t.c.recipient)).where(
            messages_t.c.state.in_(("sent", "bounced")), messages_t.c.finished_at >= since
        )
        return contacts_t.c.email.in_(sent)
    raise AssertionError(kind)


def compile_where(rules: Any, bind: Any, now: datetime | None = None, after: int | None = None) -> ColumnElement:
    """The WHERE clause selecting the contacts the rules describe (those with ids above `after`, if given),
    in the SQL of `bind`: an Engine, Connection, Session or SQLAlchemy Dialect."""
    where = _clause(parse(rules), json_attributes.for_bind(bind), now or utcnow(), after)
    return where if after is None else and_(contacts_t.c.id > after, where)


def audience_query(rules: Any, bind: Any = None, now: datetime | None = None, after: int | None = None) -> Select:
    """SELECT contacts.id of a segment's audience, for callers to page through by keyset, e.g.
    `audience_query(r, after=last_id).order_by(contacts.c.id).limit(1000)`.
    `rules` is a rule tree or a saved segment's name; `bind` as for compile_where (default: the engine)."""
    return select(contacts_t.c.id).where(compile_where(_resolve(rules), bind or get_engine(), now, after))


# --- Saved segments and their use ------------------------------------------------------------------


def _check_lists(node: Any) -> None:
    """A rule naming a list that does not exist is a mistake worth an error, not an empty segment."""
    names = []

    def walk(n: Any) -> None:
        if isinstance(n, Group):
            for r in n.rules:
                walk(r)
        elif isinstance(n, Not):
            walk(n.rule)
        elif isinstance(n, Simple) and n.kind == "list":
            names.append((n.value, n.path))

    walk(node)
    if names:
        with session_scope() as session:
            known = set(session.scalars(select(ContactList.name).where(ContactList.name.in_([n for n, _ in names]))))
        for name, where in names:
            if name not in known:
                raise InvalidSegment(f"no list named {name!r}", field=where)


def _resolve(rules_or_name: Any) -> Any:
    if isinstance(rules_or_name, str):
        with session_scope() as session:
            rules = session.scalar(select(Segment.rules).where(Segment.name == rules_or_name))
        if rules is None:
            raise InvalidSegment(f"no segment named {rules_or_name!r}", field="segment")
        return rules
    return rules_or_name


def check(rules: Any) -> None:
    """Raise InvalidSegment if the rules are malformed or name a list that does not exist."""
    _check_lists(parse(rules))


def _as_dict(row: Segment) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "rules": row.rules,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _is_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable() and "/" not in name


def save_segment(name: str, rules: Any) -> dict[str, Any]:
    """Create or replace a saved segment (checked first: a bad rule stores nothing)."""
    return put_segment(name, rules)[0]


def put_segment(name: str, rules: Any) -> tuple[dict[str, Any], bool]:
    """save_segment, and whether the segment is new. Two concurrent creates of one name: the
    second replaces the first (the unique name makes the loser retry as an update)."""
    if not _is_name(name):
        raise InvalidSegment("a segment name is 1-200 printable characters other than /", field="name")
    check(rules)
    for attempt in range(2):
        try:
            return _put(name, rules)
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _put(name: str, rules: Any) -> tuple[dict[str, Any], bool]:
    now = utcnow()
    with session_scope() as session:
        row = session.scalar(select(Segment).where(Segment.name == name))
        created = row is None
        if row is None:
            row = Segment(name=name, rules=rules, created_at=now, updated_at=now)
            session.add(row)
        else:
            row.rules, row.updated_at = rules, now
        session.flush()
        return _as_dict(row), created


def get_segment(name: str) -> dict[str, Any]:
    """A saved segment; NotFound if there is none by that name."""
    with session_scope() as session:
        row = session.scalar(select(Segment).where(Segment.name == name)) if _is_name(name) else None
        if row is None:
            raise NotFound(f"no segment named {name!r}")
        return _as_dict(row)


def saved_rules(name: str) -> Any:
    """The rules of a saved segment, for count() and preview(); NotFound if there is none."""
    return get_segment(name)["rules"]


def list_segments(*, limit: int, after: str | None = None) -> list[dict[str, Any]]:
    """Saved segments by name, from the name after `after` (keyset paging)."""
    query = select(Segment).order_by(Segment.name).limit(limit)
    if after is not None:
        query = query.where(Segment.name > after)
    with session_scope() as session:
        return [_as_dict(row) for row in session.scalars(query)]


def get_segments() -> list[dict[str, Any]]:
    with session_scope() as session:
        return [
            {"id": s.id, "name": s.name, "rules": s.rules, "updated_at": s.updated_at}
            for s in session.scalars(select(Segment).order_by(Segment.name))
        ]


def delete_segment(name: str) -> bool:
    if not _is_name(name):  # no segment has such a name; PostgreSQL would refuse a NUL in it
        return False
    with session_scope() as session:
        row = session.scalar(select(Segment).where(Segment.name == name))
        if row is None:
            return False
        session.delete(row)
        return True


def count(rules_or_name: Any) -> int:
    """How many contacts the rules (or the saved segment of that name) select: one query."""
    rules = _resolve(rules_or_name)
    check(rules)
    query = select(func.count()).select_from(contacts_t).where(compile_where(rules, get_engine()))
    with reader() as connection:
        return connection.scalar(query) or 0


def preview(rules_or_name: Any, limit: int = 10) -> list[dict[str, Any]]:
    """The first `limit` contacts (by id) the rules select."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise InvalidSegment("must be a whole number from 1 to 1000", field="limit")
    rules = _resolve(rules_or_name)
    check(rules)
    engine = get_engine()
    with session_scope() as session:
        rows = session.scalars(select(Contact).where(compile_where(rules, engine)).order_by(Contact.id).limit(limit))
        return [as_dict(c) for c in rows]
