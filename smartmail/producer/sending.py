"""The producer API: validate, render and store messages, then publish delivery tasks after the commit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, select

from smartmail.addresses import AddressError, check_headers, normalize_address, parse_mailbox
from smartmail.config import get_settings
from smartmail.content import rendering, tracking_links
from smartmail.errors import InvalidMessage
from smartmail.producer.handoff import hand_off, hand_off_now
from smartmail.store.engine import get_engine, statement_connection, utcnow
from smartmail.store.ids import new_ids
from smartmail.store.models import Message, MessageState, Suppression
from smartmail.store.sql import messages as messages_sql

log = structlog.get_logger("smartmail.producer")

_MAX_TAGS = 20


@dataclass(frozen=True)
class SendResult:
    """What became of a send: `state` is queued, scheduled or suppressed; `reason` says why it was not queued."""

    id: str
    state: str
    reason: str | None = None
    duplicate: bool = False  # the idempotency key was seen before; this is the earlier message

    def __str__(self) -> str:
        return self.id


def _prepare(spec: Mapping[str, Any], prefix: str, settings) -> dict[str, Any]:
    """Validate and render one message spec into a row; raise InvalidMessage naming the field."""
    allowed = {
        "to",
        "template",
        "subject",
        "html",
        "text",
        "context",
        "from_",
        "reply_to",
        "headers",
        "tags",
        "idempotency_key",
        "send_at",
        "track",
    }
    unknown = set(spec) - allowed
    if unknown:
        raise InvalidMessage(f"unknown field(s) {', '.join(sorted(unknown))}", field=prefix.rstrip(".") or "send")
    try:
        to = parse_mailbox(spec.get("to"), field=f"{prefix}to")
        sender = parse_mailbox(spec.get("from_") or settings.default_sender, field=f"{prefix}from_")
        reply_to = parse_mailbox(spec["reply_to"], field=f"{prefix}reply_to") if spec.get("reply_to") else None
        headers = check_headers(spec.get("headers"), field=f"{prefix}headers")
    except AddressError as exc:
        raise InvalidMessage(exc.reason, field=exc.field) from None
    tags = list(spec.get("tags") or [])
    if len(tags) > _MAX_TAGS or not all(isinstance(t, str) and 0 < len(t) <= 64 and t.isprintable() for t in tags):
        raise InvalidMessage(f"at most {_MAX_TAGS} printable strings of 1-64 characters", field=f"{prefix}tags")
    key = spec.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 255):
        raise InvalidMessage("must be a string of 1-255 characters", field=f"{prefix}idempotency_key")
    send_at = spec.get("send_at")
    if send_at is not None:
        if not isinstance(send_at, datetime):
            raise InvalidMessage("must be a datetime", field=f"{prefix}send_at")
        if send_at.tzinfo is not None:  # naive datetimes are taken as UTC
            send_at = send_at.astimezone(UTC).replace(tzinfo=None)
    track = spec.get("track")
    if track is None:
        track = settings.track_transactional
    elif not isinstance(track, bool):
        raise InvalidMessage("must be true or false", field=f"{prefix}track")
    context = spec.get("context") or {}
    if not isinstance(context, Mapping):
        raise InvalidMessage("must be a mapping", field=f"{prefix}context")
    return {
        "to": to,
        "sender": sender,
        "reply_to": reply_to,
        "headers": headers,
        "tags": tags,
        "idempotency_key": key,
        "send_at": send_at,
        "context": dict(context),
        "template": spec.get("template"),
        "subject": spec.get("subject"),
        "html": spec.get("html"),
        "text": spec.get("text"),
        "track": track,
        "prefix": prefix,
    }


def _render(connection, prepared: dict[str, Any], settings) -> rendering.Rendered:
    prefix = prepared["prefix"]
    if prepared["template"] is not None and any(prepared[p] is not None for p in ("subject", "html", "text")):
        raise InvalidMessage("give either a template or subject/html/text, not both", field=f"{prefix}template")
    try:
        return rendering.render(
            connection,
            context=prepared["context"],
            template=prepared["template"],
            subject=prepared["subject"],
            html=prepared["html"],
            text=prepared["text"],
            templates_dir=settings.templates_dir,
            cache_seconds=settings.template_cache_seconds,
        )
    except rendering.TemplateError as exc:
        raise InvalidMessage(str(exc), field=f"{prefix}template") from None
    except AddressError as exc:  # a subject with a line break in it, as given or as rendered
        raise InvalidMessage(exc.reason, field=f"{prefix}subject") from None
    except (LookupError, ValueError) as exc:  # TemplateNotFound, bad template reference
        raise InvalidMessage(str(exc), field=f"{prefix}template") from None


def _row(
    message_id: str, item: dict[str, Any], rendered: rendering.Rendered, settings, now: datetime
) -> dict[str, Any]:
    html, text = rendered.html, rendered.text
    if item["track"]:
        html, text = tracking_links.track(html, text, message_id=message_id, honeypot=settings.track_honeypot)
    return {
        "id": message_id,
        "idempotency_key": item["idempotency_key"],
        "sender": str(item["sender"]),
        "recipient": str(item["to"]),
        "reply_to": str(item["reply_to"]) if item["reply_to"] else None,
        "subject": rendered.subject,
        "html": html,
        "text": text,
        "headers": item["headers"],
        "tags": item["tags"],
        "message_id_header": f"<{message_id}@{settings.sender_domain}>",
        "template_name": rendered.template_name,
        "template_version": rendered.template_version,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": None,
        "next_attempt_at": None,
        "claimed_at": None,
        "finished_at": None,
        "smtp_code": None,
        "smtp_reply": None,
        "reason": None,
        "send_at": None,
        "_address": item["to"].address,
        "_send_at": item["send_at"],
    }


def _commit(rows: list[dict[str, Any]], now: datetime, settings, reader) -> list[SendResult]:
    """Store the rows (one in one autocommit statement on `reader`, more in one transaction), then
    hand the queued ones to the workers."""
    if len(rows) == 1:  # send(): one autocommit statement, see store.sql.messages
        results = [_store_one(reader, rows[0], now)]
    else:
        with get_engine().begin() as connection:
            results = _store(connection, rows, now)
    for r in results:  # one line per message; a duplicate changed nothing
        if not r.duplicate:
            log.info("message.created", message_id=r.id, state=r.state, reason=r.reason)
    queued = [r.id for r in results if r.state == MessageState.QUEUED and not r.duplicate]
    (hand_off if settings.dispatch_in_background else hand_off_now)(queued)
    return results


def send_many(specs: Sequence[Mapping[str, Any]]) -> list[SendResult]:
    """Validate and render every message first (one bad message: an error naming it, nothing stored),
    then store them in one transaction and hand the queued ones to the workers: by default a
    background thread pushes their ids to Redis in one call (`smartmail.flush()` waits for it)."""
    if not specs:
        return []
    settings = get_settings()
    now = utcnow()
    prepared = [_prepare(spec, f"messages[{i}]." if len(specs) > 1 else "", settings) for i, spec in enumerate(specs)]
    # Render outside the write transaction (on SQLite it would hold the one write lock meanwhile).
    # Core connections, not an ORM session: this runs once per send() and a session's bookkeeping
    # cost more than the statements.
    with statement_connection() as reader:
        rows = [
            _row(message_id, item, _render(reader, item, settings), settings, now)
            for message_id, item in zip(new_ids(len(prepared)), prepared)
        ]
        return _commit(rows, now, settings, reader)


def send_each(specs: Sequence[Mapping[str, Any]], *, prefix: str = "messages") -> list[SendResult | InvalidMessage]:
    """send_many for a batch whose bad messages must not stop the good ones: each result is the
    message's SendResult or the InvalidMessage (naming `messages[i].field`) that kept it out."""
    settings = get_settings()
    now = utcnow()
    outcomes: list[SendResult | InvalidMessage | None] = [None] * len(specs)
    rows: list[tuple[int, dict[str, Any]]] = []
    ids = new_ids(len(specs))  # one call for the batch's randomness, not one per message
    with statement_connection() as reader:
        for i, spec in enumerate(specs):
            try:
                item = _prepare(spec, f"{prefix}[{i}].", settings)
                rows.append((i, _row(ids[i], item, _render(reader, item, settings), settings, now)))
            except InvalidMessage as exc:
                outcomes[i] = exc
        if rows:
            for (i, _), result in zip(rows, _commit([row for _, row in rows], now, settings, reader)):
                outcomes[i] = result
    return outcomes  # type: ignore[return-value]  # every slot is filled above


_suppressed = select(Suppression.email, Suppression.reason).where(
    Suppression.email.in_(bindparam("emails", expanding=True))
)
_owners = select(Message.id, Message.idempotency_key, Message.state, Message.reason).where(
    Message.idempotency_key.in_(bindparam("keys", expanding=True))
)


def _chunks(values: list, size: int = 5000):
    """Bounded IN lists: SQLite allows 32,766 parameters per statement, PostgreSQL 65,535."""
    return (values[i : i + size] for i in range(0, len(values), size))


def _unsuppressed_state(row: dict[str, Any], now: datetime) -> None:
    """Set the row's state and times as if its recipient were not suppressed."""
    send_at = row.pop("_send_at")
    if send_at is not None and send_at > now:
        row.update(state=MessageState.SCHEDULED.value, next_attempt_at=send_at, send_at=send_at)
    else:
        row.update(state=MessageState.QUEUED.value, enqueued_at=now)


def _store(connection, rows: list[dict[str, Any]], now: datetime) -> list[SendResult]:
    emails = list({normalize_address(r["_address"]) for r in rows})
    suppressed = {
        email: reason
        for chunk in _chunks(emails)
        for email, reason in connection.execute(_suppressed, {"emails": chunk})
    }
    for row in rows:
        reason = suppressed.get(normalize_address(row.pop("_address")))
        _unsuppressed_state(row, now)
        if reason:
            row.update(
                state=MessageState.SUPPRESSED.value,
                reason=f"recipient suppressed: {reason}",
                finished_at=now,
                enqueued_at=None,
                next_attempt_at=None,
                send_at=None,
            )
    # Two messages in one batch with the same key: the first one wins, the rest are duplicates.
    seen: set[str] = set()
    unique = []
    for r in rows:
        key = r["idempotency_key"]
        if key is None or key not in seen:
            unique.append(r)
        if key:
            seen.add(key)
    messages_sql.for_bind(connection).insert_many(connection, unique)
    keys = [r["idempotency_key"] for r in rows if r["idempotency_key"]]
    owners = {m.idempotency_key: m for chunk in _chunks(keys) for m in connection.execute(_owners, {"keys": chunk})}
    results = []
    for r in rows:
        owner = owners.get(r["idempotency_key"]) if r["idempotency_key"] else None
        if owner is None or owner.id == r["id"]:
            results.append(SendResult(r["id"], r["state"], r["reason"]))
        else:
            results.append(SendResult(owner.id, owner.state, owner.reason, duplicate=True))
    return results


def _store_one(connection, row: dict[str, Any], now: datetime) -> SendResult:
    _unsuppressed_state(row, now)
    email = normalize_address(row.pop("_address"))
    stored = messages_sql.for_bind(connection).insert_one(connection, row, email)
    if stored is not None:
        return SendResult(row["id"], *stored)  # (state, reason)
    owner = connection.execute(_owners, {"keys": [row["idempotency_key"]]}).first()
    return SendResult(owner.id, owner.state, owner.reason, duplicate=True)


def send(
    to: str,
    *,
    template: str | None = None,
    subject: str | None = None,
    html: str | None = None,
    text: str | None = None,
    context: Mapping[str, Any] | None = None,
    from_: str | None = None,
    reply_to: str | None = None,
    headers: Mapping[str, str] | None = None,
    tags: Iterable[str] | None = None,
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    track: bool | None = None,
) -> SendResult:
    """Queue one transactional email and return at once; see send_many for the guarantees.
    `track`: rewrite links for click tracking and add the open pixel (default:
    SMARTMAIL_TRACK_TRANSACTIONAL, off)."""
    spec = {
        "to": to,
        "template": template,
        "subject": subject,
        "html": html,
        "text": text,
        "context": context,
        "from_": from_,
        "reply_to": reply_to,
        "headers": headers,
        "tags": list(tags or []),
        "idempotency_key": idempotency_key,
        "send_at": send_at,
        "track": track,
    }
    return send_many([spec])[0]
