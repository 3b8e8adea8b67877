"""Opens and clicks: the Redis stream the web processes write, and the events worker's batched drain into `events`."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis
import structlog
from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.content import tracking_links
from smartmail.feedback import machine
from smartmail.store import checkpoints, dialect
from smartmail.store.engine import get_engine
from smartmail.store.models import Contact, EngagementFirst, EventType, Message
from smartmail.store.sql import events as events_sql

log = structlog.get_logger("smartmail.tracking")

STREAM = "smartmail:tracking"  # under SMARTMAIL_REDIS_KEY_PREFIX
CHECKPOINT = "tracking"  # the stream_checkpoints row holding the last stream id stored
DRAIN_TASK = "smartmail.tracking.drain"
OPEN, CLICK = "o", "c"
_MAX_AGENT = 400  # characters of a user agent kept


@dataclass(frozen=True)
class Hit:
    """One fetch of a tracking URL, as the web process saw it (`ip` already truncated)."""

    kind: str  # OPEN | CLICK
    message_id: str
    at: float  # epoch seconds
    link: int = 0
    url: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    head: bool = False  # a HEAD request: a scanner looking, not a person clicking

    @property
    def occurred_at(self) -> datetime:
        """`at` as the database keeps times: naive UTC."""
        return datetime.fromtimestamp(self.at, UTC).replace(tzinfo=None)

    def first_key(self, machine: bool) -> tuple[str, int, bool]:
        """The first-hit mark it may be: (message, link (0: the open), machine)."""
        return self.message_id, self.link if self.kind == CLICK else 0, machine

    def fields(self) -> dict[Any, Any]:  # redis-py's own parameter type
        """The hit as a Redis stream entry's fields."""
        entry: dict[Any, Any] = {"k": self.kind, "m": self.message_id, "t": repr(self.at), "l": str(self.link)}
        if self.url is not None:
            entry["u"] = self.url
        if self.ip:
            entry["ip"] = self.ip
        if self.user_agent:
            entry["ua"] = self.user_agent[:_MAX_AGENT]
        if self.head:
            entry["h"] = "1"
        return entry

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Hit:
        get = {key.decode(): value.decode("utf-8", "replace") for key, value in fields.items()}.get
        return cls(
            kind=get("k") or "",
            message_id=get("m") or "",
            at=float(get("t") or 0),
            link=int(get("l") or 0),
            url=get("u"),
            ip=get("ip"),
            user_agent=get("ua"),
            head=get("h") == "1",
        )


def stream_key() -> str:
    return f"{get_settings().redis_key_prefix}{STREAM}"


@runtime.per_process(close=lambda client, _close: client.close())
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=10, socket_connect_timeout=5)


def drain(*, batch: int = 1000, max_seconds: float = 20.0) -> tuple[int, bool]:
    """Store what the web processes left in the stream, a batch per transaction, until it is empty
    or `max_seconds` have passed: (hits stored, whether some are left for another run)."""
    started, stored = time.monotonic(), 0
    while True:
        count = _drain_batch(batch)
        stored += count
        if count < batch:
            return stored, False
        if time.monotonic() - started >= max_seconds:
            return stored, True


def _drain_batch(batch: int) -> int:
    """One batch: read after the checkpoint, store, move the checkpoint, all in one transaction
    (a crash repeats nothing and loses nothing); then trim what is stored from the stream."""
    client, key = _redis(), stream_key()
    engine = get_engine()
    with engine.begin() as connection:
        after = checkpoints.lock(connection, CHECKPOINT) or None
        entries: list[Any] = cast(list, client.xrange(key, min=f"({after}" if after else "-", count=batch))
        if not entries:
            return 0
        store(connection, [Hit.from_fields(fields) for _, fields in entries])
        last = entries[-1][0].decode()
        checkpoints.move(connection, CHECKPOINT, last)
    try:
        client.xtrim(key, minid=last, approximate=True)  # entries up to `last` are stored; the rest wait
    except redis.RedisError as exc:  # the checkpoint already skips them; the next drain trims
        log.warning("tracking.trim_failed", error=str(exc))
    return len(entries)


_messages = (
    select(Message.id, Contact.id.label("contact_id"), Message.campaign_id, Message.finished_at, Message.state)
    .outerjoin(Contact, Contact.id == Message.contact_id)  # an erased contact's events keep no contact
    .where(Message.id.in_(bindparam("ids", expanding=True)))
)


def _moved_forward(column):
    """An UPDATE (executemany) of a contact's `column` to `b_at`, unless it is later already."""
    return (
        update(Contact)
        .where(Contact.id == bindparam("b_id"), column.is_(None) | (column < bindparam("b_at")))
        .values({column: bindparam("b_at")})
    )


_last_open, _last_click = _moved_forward(Contact.last_open_at), _moved_forward(Contact.last_click_at)


def store(connection: Connection, hits: Iterable[Hit]) -> int:
    """Write `hits` as `opened` / `clicked` events: machine ones flagged, the first of each
    (message, link, human or machine) marked `unique`, the contacts' last open and click moved
    (human events only). Hits naming no stored message are dropped (a signed token of a message
    since deleted). The number of events written."""
    hits = [h for h in hits if h.kind in (OPEN, CLICK) and h.message_id]
    if not hits:
        return 0
    settings = get_settings()
    ids = list({h.message_id for h in hits})
    messages = {row.id: row for row in connection.execute(_messages, {"ids": ids})}
    known = [h for h in hits if h.message_id in messages]
    if len(known) < len(hits):
        log.info("tracking.unknown_messages", count=len(hits) - len(known))
    reasons = _machine_reasons(connection, known, messages, settings)
    keys = [hit.first_key(reason is not None) for hit, reason in zip(known, reasons)]
    times = [hit.occurred_at for hit in known]
    firsts = _new_firsts(connection, keys, times)
    rows: list[dict] = []
    last_open: dict[int, datetime] = {}
    last_click: dict[int, datetime] = {}
    for hit, reason, key, at in zip(known, reasons, keys, times):
        message = messages[hit.message_id]
        properties: dict = {"unique": key in firsts}
        firsts.discard(key)  # the batch's first hit of a new mark is the unique one
        if hit.kind == CLICK:
            properties.update(link=hit.link, url=hit.url)
        if reason:
            properties["machine_reason"] = reason
        properties.update({k: v for k, v in (("ip", hit.ip), ("user_agent", hit.user_agent)) if v})
        rows.append(
            {
                "type": (EventType.CLICKED if hit.kind == CLICK else EventType.OPENED).value,
                "contact_id": message.contact_id,
                "message_id": hit.message_id,
                "campaign_id": message.campaign_id,
                "properties": properties,
                "occurred_at": at,
                "machine": reason is not None,
            }
        )
        if reason is None and message.contact_id is not None:
            latest = last_click if hit.kind == CLICK else last_open
            latest[message.contact_id] = max(at, latest.get(message.contact_id, at))
    events_sql.for_bind(connection).load(connection, rows)
    for statement, latest in ((_last_open, last_open), (_last_click, last_click)):
        if latest:  # in id order: two drains' updates of the same contacts cannot deadlock
            connection.execute(statement, [{"b_id": c, "b_at": at} for c, at in sorted(latest.items())])
    return len(rows)


def _machine_reasons(connection: Connection, hits: list[Hit], messages: dict, settings) -> list[str | None]:
    """Why each hit is a machine's (None: a person's): the proxy and scanner signatures of
    feedback.machine, the honeypot link, a click too soon after delivery, or a click in a burst of
    several links of one message followed within seconds."""
    reasons: list[str | None] = []
    clicks_of: dict[str, list[int]] = defaultdict(list)  # message id -> positions of its clicks in `hits`
    for position, hit in enumerate(hits):
        if hit.kind == OPEN:
            reasons.append(machine.open_machine_reason(hit.user_agent, hit.ip))
            continue
        sent = messages[hit.message_id].finished_at
        after = None if sent is None else hit.at - sent.replace(tzinfo=UTC).timestamp()
        method = "HEAD" if hit.head else "GET"
        reasons.append(
            machine.HONEYPOT
            if hit.link == tracking_links.HONEYPOT
            else machine.click_machine_reason(hit.user_agent, hit.ip, method, after, settings.scanner_click_seconds)
        )
        clicks_of[hit.message_id].append(position)
    for position in _in_bursts(connection, hits, clicks_of, settings):
        reasons[position] = reasons[position] or machine.BURST
    return reasons


def _in_bursts(connection: Connection, hits: list[Hit], clicks_of: dict[str, list[int]], settings) -> list[int]:
    """The positions of the clicks in `hits` that are part of a burst, counting with this batch's
    clicks the first clicks stored before it within the burst window."""
    if not clicks_of:
        return []
    earliest = min(hits[p].at for positions in clicks_of.values() for p in positions) - settings.scanner_burst_seconds
    first = EngagementFirst
    earlier: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for message_id, link, at in connection.execute(
        select(first.message_id, first.link, first.occurred_at).where(
            first.message_id.in_(list(clicks_of)),
            first.link > 0,
            first.occurred_at >= datetime.fromtimestamp(earliest, UTC).replace(tzinfo=None),
        )
    ):
        earlier[message_id].append((at.replace(tzinfo=UTC).timestamp(), link))
    found = []
    for message_id, positions in clicks_of.items():
        clicks = [(hits[p].at, hits[p].link) for p in positions] + earlier[message_id]
        flags = machine.burst_clicks(clicks, settings.scanner_burst_links, settings.scanner_burst_seconds)
        found += [p for p, flagged in zip(positions, flags) if flagged]
    return found


def _new_firsts(connection: Connection, keys: list[tuple], times: list[datetime]) -> set[tuple]:
    """Record the first-hit marks (Hit.first_key) not seen before, each at its earliest time; the new ones."""
    candidates: dict[tuple, datetime] = {}
    for key, at in zip(keys, times):
        if key not in candidates or at < candidates[key]:
            candidates[key] = at
    if not candidates:
        return set()
    statement = (
        dialect.insert(connection)(EngagementFirst)
        .on_conflict_do_nothing(index_elements=["message_id", "link", "machine"])
        .returning(EngagementFirst.message_id, EngagementFirst.link, EngagementFirst.machine)
    )
    rows = [
        {"message_id": m, "link": link, "machine": is_machine, "occurred_at": at}
        for (m, link, is_machine), at in sorted(candidates.items())
    ]
    return {tuple(row) for row in connection.execute(statement, rows)}
