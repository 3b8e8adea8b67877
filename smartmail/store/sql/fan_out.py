"""A campaign fan-out page's message rows written in one go: COPY on PostgreSQL, a multi-row INSERT elsewhere."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.dialects import postgresql, sqlite

from smartmail.store.dialect import POSTGRESQL, SQLITE, name_of
from smartmail.store.engine import COPY_SPECIAL, insert_else_upsert
from smartmail.store.models import OF_CAMPAIGNS, VARIANT_HEADER, Campaign, Message


class MessageRow(NamedTuple):
    """What differs between a page's message rows; the rest is the campaign's (FanOutInsert)."""

    id: str
    state: str
    recipient: str
    contact_id: int
    send_at: datetime | None  # the recipient's send window opens then (state scheduled)
    enqueued_at: datetime | None
    # A/B campaigns only (campaigns/ab_tests.py): the sender, the test variant recorded, and the
    # variant whose content the message is sent with (VARIANT_HEADER). None: the campaign's, none.
    sender: str | None = None
    variant: str | None = None
    renders: str | None = None


class FanOutInsert:
    """Insert a page's message rows, skipping contacts that have one; (id, state) of those inserted."""

    def __init__(self, insert) -> None:
        self._insert = (
            insert(Message.__table__)
            .on_conflict_do_nothing(index_elements=["campaign_id", "contact_id"], index_where=OF_CAMPAIGNS)
            .returning(Message.id, Message.state)
        )

    def insert_page(
        self, session, campaign: Campaign, rows: list[MessageRow], now: datetime, domain: str
    ) -> list[tuple[str, str]]:
        shared: dict[str, Any] = {
            "idempotency_key": None,
            "sender": campaign.sender,
            "reply_to": campaign.reply_to,
            "subject": "",
            "html": None,
            "text": "",  # rendered when sent (campaign_delivery.py)
            "headers": {},
            "tags": campaign.tags,
            "template_name": campaign.template_name,
            "template_version": campaign.template_version,
            "attempts": 0,
            "created_at": now,
            "claimed_at": None,
            "finished_at": None,
            "smtp_code": None,
            "smtp_reply": None,
            "reason": None,
            "campaign_id": campaign.id,
        }
        values = [
            {
                **shared,
                "id": r.id,
                "state": r.state,
                "recipient": r.recipient,
                "message_id_header": f"<{r.id}@{domain}>",
                "enqueued_at": r.enqueued_at,
                "next_attempt_at": r.send_at,
                "send_at": r.send_at,
                "contact_id": r.contact_id,
            }
            for r in rows
        ]
        if campaign.ab_test is not None:
            for value, r in zip(values, rows):
                value.update(sender=r.sender or campaign.sender, variant=r.variant, headers={VARIANT_HEADER: r.renders})
        return [tuple(r) for r in session.execute(self._insert, values)]


# On PostgreSQL a page goes through COPY into a staging table and one INSERT … SELECT: the generic
# multi-row INSERT … RETURNING took more than half of a worker's CPU while a campaign fanned out
# (psycopg parses every such statement's thousands of placeholders).
_PG_FAN_OUT_STAGING = """CREATE TEMP TABLE IF NOT EXISTS smartmail_fan_out (
    id text, state text, recipient text, contact_id bigint, due timestamp, enqueued_at timestamp)
    ON COMMIT DELETE ROWS"""
_PG_FAN_OUT_INSERT = """INSERT INTO messages (id, state, sender, recipient, reply_to, subject, text, headers, tags,
    message_id_header, template_name, template_version, attempts, created_at, enqueued_at, next_attempt_at, send_at,
    campaign_id, contact_id)
SELECT s.id, s.state, %(sender)s, s.recipient, %(reply_to)s, '', '', '{}'::json, %(tags)s::json,
    '<' || s.id || '@' || %(domain)s || '>', %(template)s, %(version)s, 0, %(now)s, s.enqueued_at, s.due, s.due,
    %(campaign)s, s.contact_id
FROM smartmail_fan_out s"""
_ON_CONFLICT = " ON CONFLICT (campaign_id, contact_id) WHERE campaign_id IS NOT NULL DO NOTHING RETURNING id, state"
_PG_FAN_OUT_UPSERT = _PG_FAN_OUT_INSERT + _ON_CONFLICT
# An A/B campaign's pages: a staging table of their own, with each row's sender and variants.
_PG_AB_STAGING = """CREATE TEMP TABLE IF NOT EXISTS smartmail_fan_out_ab (
    id text, state text, recipient text, contact_id bigint, due timestamp, enqueued_at timestamp,
    sender text, variant text, renders text) ON COMMIT DELETE ROWS"""
_PG_AB_INSERT = f"""INSERT INTO messages (id, state, sender, recipient, reply_to, subject, text, headers, tags,
    message_id_header, template_name, template_version, attempts, created_at, enqueued_at, next_attempt_at, send_at,
    campaign_id, contact_id, variant)
SELECT s.id, s.state, s.sender, s.recipient, %(reply_to)s, '', '', json_build_object('{VARIANT_HEADER}', s.renders),
    %(tags)s::json, '<' || s.id || '@' || %(domain)s || '>', %(template)s, %(version)s, 0, %(now)s, s.enqueued_at,
    s.due, s.due, %(campaign)s, s.contact_id, s.variant
FROM smartmail_fan_out_ab s"""
_PG_AB_UPSERT = _PG_AB_INSERT + _ON_CONFLICT


class PostgresqlFanOutInsert(FanOutInsert):
    """COPY into a staging table and one INSERT … SELECT; the INSERT path when an address would need escaping."""

    def __init__(self) -> None:
        super().__init__(postgresql.insert)

    def insert_page(
        self, session, campaign: Campaign, rows: list[MessageRow], now: datetime, domain: str
    ) -> list[tuple[str, str]]:
        if campaign.ab_test is not None:
            if COPY_SPECIAL.search("".join(f"{r.recipient}{r.sender}" for r in rows)):
                return super().insert_page(session, campaign, rows, now, domain)
            return self._copy_ab_page(session.connection(), campaign, rows, now, domain)
        if COPY_SPECIAL.search("".join(r.recipient for r in rows)):
            return super().insert_page(session, campaign, rows, now, domain)
        return self._copy_page(session.connection(), campaign, rows, now, domain)

    def _copy_page(
        self, connection, campaign: Campaign, rows: list[MessageRow], now: datetime, domain: str
    ) -> list[tuple[str, str]]:
        now_text = now.isoformat(sep=" ")  # most rows' enqueued_at: formatted once a page

        def stamp(moment: datetime | None) -> str:
            if moment is None:
                return "\\N"
            return now_text if moment is now else moment.isoformat(sep=" ")

        cursor = connection.connection.driver_connection.cursor()
        cursor.execute(_PG_FAN_OUT_STAGING)
        with cursor.copy("COPY smartmail_fan_out FROM STDIN") as copy:
            copy.write(
                "".join(
                    [
                        f"{r.id}\t{r.state}\t{r.recipient}\t{r.contact_id}\t{stamp(r.send_at)}\t"
                        f"{stamp(r.enqueued_at)}\n"
                        for r in rows
                    ]
                )
            )
        params = {
            "sender": campaign.sender,
            "reply_to": campaign.reply_to,
            "tags": json.dumps(campaign.tags),
            "domain": domain,
            "template": campaign.template_name,
            "version": campaign.template_version,
            "now": now,
            "campaign": campaign.id,
        }
        # The page's contacts come after the checkpoint, committed with the rows before them, so none
        # has a row yet (a plain INSERT skips ON CONFLICT's cost), and the rows are known: nothing to
        # return. Should one have a row after all (a relaunch), the page adds only the others.
        upserted = insert_else_upsert(cursor, _PG_FAN_OUT_INSERT, _PG_FAN_OUT_UPSERT, params)
        return [(r.id, r.state) for r in rows] if upserted is None else upserted

    def _copy_ab_page(
        self, connection, campaign: Campaign, rows: list[MessageRow], now: datetime, domain: str
    ) -> list[tuple[str, str]]:
        """_copy_page for an A/B campaign's rows (variant names are letters, digits and _ . -)."""

        null = "\\N"

        def stamp(moment: datetime | None) -> str:
            return null if moment is None else moment.isoformat(sep=" ")

        cursor = connection.connection.driver_connection.cursor()
        cursor.execute(_PG_AB_STAGING)
        with cursor.copy("COPY smartmail_fan_out_ab FROM STDIN") as copy:
            copy.write(
                "".join(
                    [
                        f"{r.id}\t{r.state}\t{r.recipient}\t{r.contact_id}\t{stamp(r.send_at)}\t"
                        f"{stamp(r.enqueued_at)}\t{r.sender or campaign.sender}\t{r.variant or null}\t{r.renders}\n"
                        for r in rows
                    ]
                )
            )
        params = {
            "reply_to": campaign.reply_to,
            "tags": json.dumps(campaign.tags),
            "domain": domain,
            "template": campaign.template_name,
            "version": campaign.template_version,
            "now": now,
            "campaign": campaign.id,
        }
        upserted = insert_else_upsert(cursor, _PG_AB_INSERT, _PG_AB_UPSERT, params)
        return [(r.id, r.state) for r in rows] if upserted is None else upserted


class SqliteFanOutInsert(FanOutInsert):
    """One multi-row INSERT … ON CONFLICT DO NOTHING RETURNING."""

    def __init__(self) -> None:
        super().__init__(sqlite.insert)


_BY_DIALECT = {POSTGRESQL: PostgresqlFanOutInsert(), SQLITE: SqliteFanOutInsert()}


def for_bind(bind: Any) -> FanOutInsert:
    """The implementation for an Engine, Connection or Session."""
    return _BY_DIALECT[name_of(bind)]
