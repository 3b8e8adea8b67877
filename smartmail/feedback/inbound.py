"""Inbound mail: the spool `smartmail inbound` writes before it answers, and the events worker's processing of it."""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session, defer

from smartmail.errors import ConflictingInput, InvalidInput, NotFound
from smartmail.feedback.classify import AUTO_REPLY, BOUNCE, COMPLAINT, DELAYED, UNRECOGNISED, UNSUBSCRIBE, classify
from smartmail.feedback.effects import Applied, apply_in
from smartmail.feedback.findings import Finding
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import InboundMessage, InboundState
from smartmail.workers import dispatch

log = structlog.get_logger("smartmail.inbound")

PROCESS_TASK = "smartmail.inbound.process"
MAX_ATTEMPTS = 5
BATCH_BYTES = 32 * 1024 * 1024  # mail held in memory per batch: a few large mails make a batch alone
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]{1,250}>)", re.IGNORECASE | re.MULTILINE)


def spool(mail_from: str, recipients: Sequence[str], raw: bytes, peer: str | None = None) -> str:
    """Store one accepted mail (committed when this returns, before the SMTP reply); its id."""
    return spool_many([(mail_from, recipients, raw, peer)])[0]


def spool_many(mails: Sequence[tuple[str, Sequence[str], bytes, str | None]]) -> list[str]:
    """Store (mail_from, recipients, raw, peer) mails in one transaction; their ids."""
    ids = [new_id() for _ in mails]
    now = utcnow()
    with session_scope() as session:
        session.execute(
            insert(InboundMessage),
            [
                {
                    "id": inbound_id,
                    "state": InboundState.PENDING.value,
                    "received_at": now,
                    "peer": peer,
                    "mail_from": mail_from[:320],
                    "recipients": list(recipients),
                    "raw": raw,
                    "attempts": 0,
                }
                for inbound_id, (mail_from, recipients, raw, peer) in zip(ids, mails, strict=True)
            ],
        )
    return ids


class GroupSpool:
    """`spool` for many SMTP sessions at once: the mails that arrive while a commit runs are stored
    together by the next one (group commit), so each session still has its mail committed before
    its 250, at one commit per group instead of one per mail. Called from threads; blocks until the
    caller's mail is committed, raising what the commit raised."""

    def __init__(self, max_group: int = 200) -> None:
        self.max_group = max_group
        self.waiting: queue.SimpleQueue[_Waiting] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="inbound-spool", daemon=True)
        self.thread.start()

    def __call__(self, mail_from: str, recipients: Sequence[str], raw: bytes, peer: str | None = None) -> str:
        waiting = _Waiting((mail_from, recipients, raw, peer))
        self.waiting.put(waiting)
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.inbound_id

    def _run(self) -> None:
        while True:
            group = [self.waiting.get()]
            while len(group) < self.max_group:
                try:
                    group.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                for waiting, inbound_id in zip(group, spool_many([w.mail for w in group]), strict=True):
                    waiting.inbound_id = inbound_id
            except Exception as exc:  # noqa: BLE001 - handed to the callers: none is acknowledged
                if len(group) == 1:
                    group[0].error = exc
                else:  # one bad mail must not fail the others: each alone
                    for waiting in group:
                        try:
                            waiting.inbound_id = spool_many([waiting.mail])[0]
                        except Exception as alone:  # noqa: BLE001 - this mail's own failure
                            waiting.error = alone
            for waiting in group:
                waiting.done.set()


@dataclass
class _Waiting:
    mail: tuple[str, Sequence[str], bytes, str | None]
    done: threading.Event = field(default_factory=threading.Event)
    inbound_id: str = ""
    error: Exception | None = None


@dataclass
class Processed:
    """What one run of `process_pending` did."""

    mails: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    applied: Applied = field(default_factory=Applied)
    failed: int = 0  # mails set aside after MAX_ATTEMPTS
    more: bool = False  # time ran out with mail still pending


def process_pending(*, batch: int = 200, seconds: float = 10.0) -> Processed:
    """Classify and apply pending inbound mail, up to `batch` mails (and BATCH_BYTES of them) per
    transaction, for up to `seconds`.

    A mail is `processed` in the transaction that applies its effects, so a crash anywhere leaves
    it `pending` and the next run does it all again, once (the effects' marks see to that).
    Several workers share the spool (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite serializes
    writers). Each run counts an attempt on its mails before it starts on them, so a mail that
    raises, or kills its worker, MAX_ATTEMPTS times is set aside as `failed`; a batch that raises
    is retried a mail at a time, so one bad mail holds up no other."""
    result = Processed()
    deadline = time.monotonic() + seconds
    while True:
        ids = _start(batch, result)
        if not ids:
            break
        try:
            with session_scope() as session:
                rows = _lock(session, ids)
                if rows:
                    _process(session, rows, result)
        except Exception:  # noqa: BLE001 - isolated below; each mail's error is logged there
            log.warning("inbound.batch_failed", exc_info=True)
            _process_one_by_one(ids, result)
        if time.monotonic() >= deadline:
            result.more = True
            break
    if result.mails or result.failed:
        log.info("inbound.processed", mails=result.mails, failed=result.failed, **result.verdicts)
    return result


def _start(limit: int, result: Processed) -> list[str]:
    """The next pending mails (oldest first, up to `limit` and BATCH_BYTES, at least one), each with
    one more attempt counted and committed; mails out of attempts become `failed` instead."""
    with session_scope() as session:
        rows = session.execute(
            select(InboundMessage.id, InboundMessage.attempts, func.length(InboundMessage.raw))
            .where(InboundMessage.state == InboundState.PENDING.value)
            .order_by(InboundMessage.received_at, InboundMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        ids: list[str] = []
        exhausted: list[str] = []
        spent = 0
        for inbound_id, attempts, size in rows:
            if attempts >= MAX_ATTEMPTS:
                exhausted.append(inbound_id)
                continue
            if ids and spent + size > BATCH_BYTES:
                break
            ids.append(inbound_id)
            spent += size
        if exhausted:
            session.execute(
                update(InboundMessage)
                .where(InboundMessage.id.in_(exhausted))
                .values(state=InboundState.FAILED.value, processed_at=utcnow())
            )
            log.error("inbound.failed", inbound_ids=exhausted, attempts=MAX_ATTEMPTS)
            result.failed += len(exhausted)
        if ids:
            session.execute(
                update(InboundMessage).where(InboundMessage.id.in_(ids)).values(attempts=InboundMessage.attempts + 1)
            )
    return ids


def _lock(session: Session, ids: Sequence[str]) -> list[InboundMessage]:
    """The mails among `ids` still pending, locked (another worker's run may have taken them since)."""
    return list(
        session.scalars(
            select(InboundMessage)
            .where(InboundMessage.id.in_(ids), InboundMessage.state == InboundState.PENDING.value)
            .order_by(InboundMessage.received_at, InboundMessage.id)
            .with_for_update(skip_locked=True)
        )
    )


def _report_id(raw: bytes) -> str:
    """The report's own Message-ID, else a digest of its bytes: the same report relayed twice is one."""
    end = raw.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(raw if end < 0 else raw[:end])
    if match:
        return match.group(1).decode("ascii", "replace")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _process(session: Session, rows: Sequence[InboundMessage], result: Processed) -> None:
    now = utcnow()
    findings: list[Finding] = []
    origins: list[str] = []
    outcomes = []
    for row in rows:
        classification = classify(row.raw, row.recipients)
        # A delay notice is not a failure: the relay is still trying.
        counted = [] if classification.verdict == DELAYED else list(classification.findings)
        if any(f.message_id is None and f.reference is None for f in counted):
            reference = _report_id(row.raw)
            counted = [f if f.message_id or f.reference else replace(f, reference=reference) for f in counted]
        findings.extend(counted)
        origins.extend([row.id] * len(counted))
        outcomes.append(
            {
                "row_id": row.id,
                "verdict": classification.verdict,
                "outcome": {"findings": len(classification.findings), "detail": classification.detail},
            }
        )
        result.verdicts[classification.verdict] += 1
    applied = apply_in(session, findings, origins=origins, now=now)
    table = InboundMessage.__table__  # a Core statement: one executemany, not the ORM's bulk-by-key
    session.execute(
        update(table)
        .where(table.c.id == bindparam("row_id"))
        .values(
            state=InboundState.PROCESSED.value,
            processed_at=now,
            verdict=bindparam("verdict"),
            outcome=bindparam("outcome"),
        ),
        outcomes,
    )
    result.mails += len(rows)
    result.applied.merge(applied)


def _process_one_by_one(ids: Sequence[str], result: Processed) -> None:
    """The batch again, each mail in its own transaction; a failing one keeps its error, and is
    set aside when it is out of attempts."""
    for inbound_id in ids:
        try:
            with session_scope() as session:
                rows = _lock(session, [inbound_id])
                if rows:
                    _process(session, rows, result)
        except Exception as exc:  # noqa: BLE001 - recorded on the row; the others go on
            log.exception("inbound.mail_failed", inbound_id=inbound_id)
            with session_scope() as session:
                attempts = session.scalar(
                    update(InboundMessage)
                    .where(InboundMessage.id == inbound_id, InboundMessage.state == InboundState.PENDING.value)
                    .values(outcome={"error": repr(exc)[:500]})
                    .returning(InboundMessage.attempts)
                )
                if attempts is not None and attempts >= MAX_ATTEMPTS:
                    session.execute(
                        update(InboundMessage)
                        .where(InboundMessage.id == inbound_id)
                        .values(state=InboundState.FAILED.value, processed_at=utcnow())
                    )
                    result.failed += 1


STATES = tuple(s.value for s in InboundState)
VERDICTS = (BOUNCE, DELAYED, COMPLAINT, UNSUBSCRIBE, AUTO_REPLY, UNRECOGNISED)


def as_dict(row: InboundMessage, size: int) -> dict[str, Any]:
    """An inbound mail as the API and CLI show it (its bytes: `raw_of`)."""
    return {
        "id": row.id,
        "state": row.state,
        "verdict": row.verdict,
        "received_at": row.received_at,
        "processed_at": row.processed_at,
        "peer": row.peer,
        "mail_from": row.mail_from,
        "recipients": list(row.recipients or ()),
        "size": size,
        "attempts": row.attempts,
        "outcome": row.outcome,
    }


# Rows without their bytes (up to SMARTMAIL_INBOUND_MAX_BYTES each), with the bytes' length.
_WITHOUT_RAW = select(InboundMessage, func.length(InboundMessage.raw)).options(defer(InboundMessage.raw))


def _one_of(value: str | None, allowed: tuple[str, ...], field: str) -> str | None:
    if value is not None and value not in allowed:
        raise InvalidInput(f"{value!r} is not one of {', '.join(allowed)}", field=field)
    return value


def list_inbound(
    *, limit: int, before: str | None = None, state: str | None = None, verdict: str | None = None
) -> list[dict[str, Any]]:
    """Inbound mail, newest first (ids are time-ordered), from the one before `before`."""
    query = _WITHOUT_RAW.order_by(InboundMessage.id.desc()).limit(limit)
    if before is not None:
        query = query.where(InboundMessage.id < before)
    if _one_of(state, STATES, "state"):
        query = query.where(InboundMessage.state == state)
    if _one_of(verdict, VERDICTS, "verdict"):
        query = query.where(InboundMessage.verdict == verdict)
    with session_scope() as session:
        return [as_dict(row, size) for row, size in session.execute(query)]


def _get(session: Session, inbound_id: str) -> InboundMessage:
    row = session.get(InboundMessage, inbound_id) if isinstance(inbound_id, str) and len(inbound_id) == 26 else None
    if row is None:
        raise NotFound(f"no inbound mail {inbound_id!r}")
    return row


def get_inbound(inbound_id: str) -> dict[str, Any]:
    with session_scope() as session:
        found = session.execute(_WITHOUT_RAW.where(InboundMessage.id == inbound_id)).first()
        if found is None:
            raise NotFound(f"no inbound mail {inbound_id!r}")
        return as_dict(*found)


def raw_of(inbound_id: str) -> bytes:
    """The mail's bytes as they were received."""
    with session_scope() as session:
        return _get(session, inbound_id).raw


def retry(inbound_id: str) -> None:
    """A `failed` mail back to `pending` with its attempts reset (once the cause is fixed), and processing asked for."""
    with session_scope() as session:
        row = _get(session, inbound_id)
        if row.state != InboundState.FAILED.value:
            raise ConflictingInput(
                f"inbound mail {inbound_id} is {row.state}; only a failed one is retried", field="state"
            )
        row.state, row.attempts, row.processed_at = InboundState.PENDING.value, 0, None
    dispatch.publish(PROCESS_TASK)
