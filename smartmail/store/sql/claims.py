"""The claim SQL: record a window's outcomes and claim the next window, one class per dialect."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import DateTime, String, bindparam, insert, or_, select, update

from smartmail.store import dialect
from smartmail.store.models import (
    Campaign,
    CampaignState,
    Contact,
    Event,
    Message,
    MessageState,
    Suppression,
)

_table = Message.__table__
# Core statements built once: the ORM's bulk-update path cost more than the SQL itself.
# queued -> sending for the given ids; only rows still queued come back, so a redelivered task or
# a second worker can never send a message twice.
# A claimable row: queued, or deferred and due (drains get such ids from the outbox's delayed set:
# throttled messages, short retries), and not of a paused or cancelled campaign: that is what makes
# pause and cancel take effect at once on every worker. The state test is written so that it
# implies no partial index's predicate (models.py): the rows are found by primary key, always.
_claimable = (
    _table.c.state.in_([MessageState.QUEUED.value, MessageState.DEFERRED.value]),
    or_(_table.c.state == MessageState.QUEUED.value, _table.c.next_attempt_at <= bindparam("now")),
    or_(
        _table.c.campaign_id.is_(None),
        _table.c.campaign_id.in_(select(Campaign.id).where(Campaign.state == CampaignState.SENDING.value)),
    ),
)
_claimed_columns = (
    _table.c.id,
    _table.c.sender,
    _table.c.recipient,
    _table.c.reply_to,
    _table.c.subject,
    _table.c.text,
    _table.c.html,
    _table.c.headers,
    _table.c.message_id_header,
    _table.c.attempts,
    _table.c.created_at,
    _table.c.send_at,
    _table.c.campaign_id,
    _table.c.contact_id,
)
_claim_values = {
    "state": MessageState.SENDING.value,
    "claimed_at": bindparam("now"),
    "claimed_by": bindparam("owner"),
    "attempts": _table.c.attempts + 1,
}
# Each claimed row comes with its contact (campaign messages) and the suppression of the contact's
# address, if any, for campaign_rows.prepare's re-check: read by the claim, not by a query of the
# sending thread's own (on PostgreSQL that would be a transaction of three round trips a window).
_contacts, _suppressions = Contact.__table__, Suppression.__table__
_contact_columns = (
    _contacts.c.email.label("contact_email"),
    _contacts.c.status.label("contact_status"),
    _contacts.c.attributes.label("contact_attributes"),
    _contacts.c.timezone.label("contact_timezone"),
    _suppressions.c.reason.label("suppressed"),
)
# The outcome columns record_and_claim takes, each a list with one entry per message.
OUTCOME_COLUMNS = ("id", "state", "next", "finished", "code", "reply", "reason", "unattempted")
# Each recorded outcome is also an event (sent, failed, and deferred when the relay was tried: a
# message held by traffic shaping is no news), written by the same statement or transaction: the
# stream holds an outcome if and only if it committed. EVENT_REPLY_CHARS of the reply go in it.
# The contact only if it still exists (an erased contact's id names nothing), looked up by key per
# row: a join let the one generic plan of the statement scan all of `contacts` for every window.
EVENT_REPLY_CHARS = 200
_EVENT_STATES = (MessageState.SENT.value, MessageState.FAILED.value, MessageState.DEFERRED.value)
# A campaign cancelled while a window was in flight: the window's deferred messages (held by the
# rate cap, or a 4xx) are cancelled too, else they would wait forever for a campaign that will
# never send again. Run in the recording transaction, after the cancel or before it: in the second
# case the cancel's own UPDATE waits for these rows and then finds them deferred.
_cancel_deferred_of_cancelled = (
    update(_table)
    .where(
        _table.c.id.in_(bindparam("ids", expanding=True)),
        _table.c.state == MessageState.DEFERRED.value,
        _table.c.campaign_id.in_(select(Campaign.id).where(Campaign.state == CampaignState.CANCELLED.value)),
    )
    .values(state=MessageState.CANCELLED.value, finished_at=bindparam("now"), reason="campaign cancelled")
)


class Claims:
    """A dialect's record-and-claim; the statements both dialects share are here."""

    # Whether the record-and-claim runs in a helper thread while the window before it is sent.
    in_helper_thread: bool = False
    # Whether record_and_claim is atomic on an autocommit connection, with no transaction around it.
    atomic_alone: bool = False

    @contextmanager
    def transaction(self, engine) -> Iterator:
        """A transaction for a window whose outcomes need more than the one statement (deferrals, bounces)."""
        with engine.begin() as connection:
            yield connection

    def record_and_claim(
        self, connection, outcomes: dict[str, list], ids: Sequence[str], now: datetime, owner: str
    ) -> list:
        """Write `outcomes` (OUTCOME_COLUMNS) of rows `owner` claimed, then claim `ids` for it; the
        claimed rows, with their contacts."""
        raise NotImplementedError

    def lock_campaigns_of(self, connection, ids: Sequence[str]) -> None:
        """Lock the campaigns of messages `ids` before their deferrals are recorded (see PostgresClaims)."""

    def cancel_deferred_of_cancelled(self, connection, ids: Sequence[str], now: datetime) -> None:
        connection.execute(_cancel_deferred_of_cancelled, {"ids": ids, "now": now})


# SQLite: the claim, then its rows with their contacts, in the same transaction.
_claim = (
    update(_table)
    .where(_table.c.id.in_(bindparam("ids", expanding=True)), *_claimable)
    .values(**_claim_values)
    .returning(_table.c.id)
)
_claimed_rows = (
    select(*_claimed_columns, *_contact_columns)
    .select_from(
        _table.outerjoin(_contacts, _contacts.c.id == _table.c.contact_id).outerjoin(
            _suppressions, _suppressions.c.email == _contacts.c.email
        )
    )
    .where(_table.c.id.in_(bindparam("ids", expanding=True)))
)
# SQLite: one statement, executed many times (executemany), for every outcome of a window.
# The WHERE on state and owner makes the write conditional: a row someone else already moved, or
# that recovery gave to another worker (workers/ownership.py), is left alone.
_record = (
    update(_table)
    # (An IN list cannot be used with executemany, hence the OR.) `unknown` is included so a late
    # outcome from a worker the reconciler gave up on still records the truth.
    .where(
        _table.c.id == bindparam("b_id"),
        or_(_table.c.state == MessageState.SENDING.value, _table.c.state == MessageState.UNKNOWN.value),
        _table.c.claimed_by == bindparam("b_owner"),
    )
    .values(
        state=bindparam("b_state"),
        next_attempt_at=bindparam("b_next"),
        finished_at=bindparam("b_finished"),
        smtp_code=bindparam("b_code"),
        smtp_reply=bindparam("b_reply"),
        reason=bindparam("b_reason"),
        # A message held back by traffic shaping was not attempted: its retry backoff must not grow.
        attempts=_table.c.attempts - bindparam("b_unattempted"),
    )
)
_RECORD_KEYS = tuple("b_" + c for c in OUTCOME_COLUMNS)
_recordable = select(_table.c.id).where(
    _table.c.id.in_(bindparam("ids", expanding=True)),
    _table.c.state.in_([MessageState.SENDING.value, MessageState.UNKNOWN.value]),
    _table.c.claimed_by == bindparam("owner"),
)
# The event of one outcome; the contact only if it still exists (an erased contact's id names nothing).
_events = Event.__table__
_log_event = insert(_events).from_select(
    ["type", "contact_id", "message_id", "campaign_id", "properties", "occurred_at"],
    select(
        bindparam("e_type", type_=String()),
        _contacts.c.id,
        _table.c.id,
        _table.c.campaign_id,
        bindparam("e_properties", type_=_events.c.properties.type),
        bindparam("e_now", type_=DateTime()),
    )
    .select_from(_table.outerjoin(_contacts, _contacts.c.id == _table.c.contact_id))
    .where(_table.c.id == bindparam("e_id")),
)


def _is_news(row: dict) -> bool:
    held = row["b_state"] == MessageState.DEFERRED.value and row["b_unattempted"]  # by shaping, not the relay
    return row["b_state"] in _EVENT_STATES and not held


def _event_of(row: dict, now: datetime) -> dict:
    properties = {"smtp_code": row["b_code"], "reply": (row["b_reply"] or "")[:EVENT_REPLY_CHARS] or None}
    if row["b_next"] is not None:
        properties["next_attempt_at"] = row["b_next"].isoformat()
    return {
        "e_type": row["b_state"],
        "e_id": row["b_id"],
        "e_now": now,
        "e_properties": {k: v for k, v in properties.items() if v is not None},
    }


class SqliteClaims(Claims):
    """See `Claims`. The outcomes (executemany), the claim and its rows: separate statements in one
    transaction, run inline (its one writer gains nothing from a thread)."""

    def record_and_claim(
        self, connection, outcomes: dict[str, list], ids: Sequence[str], now: datetime, owner: str
    ) -> list:
        if outcomes["id"]:
            # The rows the conditional UPDATE will change, read in its transaction: their events.
            mine = set(connection.execute(_recordable, {"ids": outcomes["id"], "owner": owner}).scalars())
            rows = [{**dict(zip(_RECORD_KEYS, row)), "b_owner": owner} for row in zip(*outcomes.values())]
            connection.execute(_record, rows)
            events = [_event_of(row, now) for row in rows if row["b_id"] in mine and _is_news(row)]
            if events:
                connection.execute(_log_event, events)
        claim = {"ids": list(ids), "now": now, "owner": owner}
        taken = connection.execute(_claim, claim).scalars().all() if ids else []
        return connection.execute(_claimed_rows, {"ids": taken}).all() if taken else []


# On PostgreSQL one statement records the previous window's outcomes and claims the next: an
# UPDATE over unnest()ed arrays (one constant statement, where an UPDATE per message cost more CPU
# on both sides), and the claim, which skips rows another worker is claiming right now
# (FOR UPDATE SKIP LOCKED: that worker will send them). Run on its own, it needs no BEGIN and
# COMMIT: one round trip a window, where a transaction of SET, UPDATE and claim took five. The
# two parts touch different rows (claimed rows are `sending`, claimable ones are not); the claimed
# rows come back with their contacts (_contact_columns). Every scan of messages has an `id = ANY`
# test, so that the one generic plan a statement connection keeps (engine.statement_connection)
# finds the rows by primary key: without the outer UPDATE's, a plan made on the statistics of an
# emptied table walked the whole primary key.
_RECORD_AND_CLAIM_PG = f"""WITH recorded AS (
  UPDATE messages m SET state = v.state, next_attempt_at = v.next, finished_at = v.finished,
      smtp_code = v.code, smtp_reply = v.reply, reason = v.reason, attempts = m.attempts - v.unattempted
  FROM unnest(%(id)b::text[], %(state)b::text[], %(next)b::timestamp[], %(finished)b::timestamp[],
              %(code)b::int[], %(reply)b::text[], %(reason)b::text[], %(unattempted)b::int[])
       AS v(id, state, next, finished, code, reply, reason, unattempted)
  WHERE m.id = ANY(%(id)b::text[]) AND m.id = v.id AND m.state IN ('sending', 'unknown')
      AND m.claimed_by = %(owner)s
  RETURNING m.id, m.contact_id, m.campaign_id, v.state, v.next, v.code, v.reply, v.unattempted),
logged AS (
  INSERT INTO events (type, contact_id, message_id, campaign_id, properties, occurred_at)
  SELECT r.state, (SELECT c.id FROM contacts c WHERE c.id = r.contact_id), r.id, r.campaign_id,
      jsonb_strip_nulls(jsonb_build_object('smtp_code', r.code, 'reply', left(r.reply, {EVENT_REPLY_CHARS}),
                                           'next_attempt_at', r.next)), %(now)s
  FROM recorded r
  WHERE r.state IN ('sent', 'failed') OR (r.state = 'deferred' AND r.unattempted = 0)),
claimed AS (
  UPDATE messages SET state = 'sending', claimed_at = %(now)s, claimed_by = %(owner)s, attempts = attempts + 1
  WHERE id = ANY(%(ids)b::text[]) AND id IN (SELECT id FROM messages WHERE id = ANY(%(ids)b::text[])
      AND state IN ('queued', 'deferred') AND (state = 'queued' OR next_attempt_at <= %(now)s)
      AND (campaign_id IS NULL OR campaign_id IN (SELECT id FROM campaigns WHERE state = 'sending'))
      FOR UPDATE SKIP LOCKED)
  RETURNING {", ".join(c.name for c in _claimed_columns)})
SELECT claimed.*, {", ".join(f"{c.element.table.name}.{c.element.name} AS {c.name}" for c in _contact_columns)}
FROM claimed LEFT JOIN contacts ON contacts.id = claimed.contact_id
    LEFT JOIN suppressions ON suppressions.email = contacts.email"""
# Taken before a window with deferrals writes its outcomes, as cancel_campaign takes the campaign's
# row before it updates the campaign's messages. Without it the two can miss each other: a cancel
# whose UPDATE saw these rows still `sending` skips them, and _cancel_deferred_of_cancelled, run
# before the cancel committed, sees the campaign still sending.
_lock_campaigns_of = (
    select(Campaign.id)
    .where(Campaign.id.in_(select(_table.c.campaign_id).where(_table.c.id.in_(bindparam("ids", expanding=True)))))
    .with_for_update(read=True)
)


class PostgresClaims(Claims):
    """See `Claims`. One statement records and claims; it runs in a helper thread, as waiting for it
    was a large share of a campaign worker's time."""

    in_helper_thread = True
    atomic_alone = True

    @contextmanager
    def transaction(self, engine) -> Iterator:
        """Planned as a statement connection's statements are: by key whatever the statistics say
        (sequential scans off: with the statistics of an emptied table the claim read all of
        `messages`), and never from a generic plan psycopg's preparing would keep (made while the
        table was small, it kept a sequential scan as the table grew). Not preparing any statement
        of the engine instead cost send_many's INSERT more PostgreSQL CPU."""
        with engine.begin() as connection:
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            driver = connection.connection.driver_connection
            threshold, driver.prepare_threshold = driver.prepare_threshold, None
            try:
                yield connection
            finally:
                driver.prepare_threshold = threshold

    def record_and_claim(
        self, connection, outcomes: dict[str, list], ids: Sequence[str], now: datetime, owner: str
    ) -> list:
        params = {**outcomes, "ids": list(ids), "now": now, "owner": owner}
        return connection.exec_driver_sql(_RECORD_AND_CLAIM_PG, params).all()

    def lock_campaigns_of(self, connection, ids: Sequence[str]) -> None:
        connection.execute(_lock_campaigns_of, {"ids": ids}).all()


_BY_DIALECT: dict[str, Claims] = {dialect.POSTGRESQL: PostgresClaims(), dialect.SQLITE: SqliteClaims()}


def for_bind(bind) -> Claims:
    """The claim SQL of the dialect an Engine, Connection or Session speaks."""
    return _BY_DIALECT[dialect.name_of(bind)]
