"""SQLAlchemy models: templates (versioned), messages (one row per email, the source of truth), suppressions."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from smartmail.store.engine import utcnow
from smartmail.store.sql.event_stream import current_transaction


class Base(DeclarativeBase):
    # Every model is mapped to a Table; SQLAlchemy types __table__ as any FromClause.
    __table__: ClassVar[Table]


class MessageState(str, enum.Enum):
    """A message's life; see DESIGN.md. Every change is a conditional UPDATE on the current state."""

    SCHEDULED = "scheduled"  # send_at in the future; beat queues it when due
    QUEUED = "queued"  # a task for it is (or should be) in Redis
    SENDING = "sending"  # claimed by a worker; SMTP transaction under way
    SENT = "sent"  # the relay answered 2xx to DATA
    DEFERRED = "deferred"  # 4xx / connection error; retried at next_attempt_at
    FAILED = "failed"  # 5xx, or deferred past the maximum age
    SUPPRESSED = "suppressed"  # recipient on the suppression list; never sent
    UNKNOWN = "unknown"  # worker died while sending; not re-sent automatically
    CANCELLED = "cancelled"  # its campaign was cancelled before it was sent
    BOUNCED = "bounced"  # sent, then a hard bounce came back (a DSN or a provider notification)

    def __str__(self) -> str:
        return self.value


class Template(Base):
    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_templates_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    preheader: Mapped[str | None] = mapped_column(Text, nullable=True)  # hidden preview text
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)  # unique, see below
    state: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    reply_to: Mapped[str | None] = mapped_column(String(320), nullable=True)
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str | None] = mapped_column(Text, nullable=True)
    text: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    message_id_header: Mapped[str] = mapped_column(String(400))
    template_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    template_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # The worker process (workers/ownership.py) whose claim put the row in `sending`.
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    send_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # when scheduled for later
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    smtp_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    smtp_reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Campaign messages: one per campaign and contact (the unique index makes a relaunch add
    # nothing); their content is rendered when sent, from the campaign's frozen template.
    campaign_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    contact_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), nullable=True)
    # A/B tests (campaigns/ab_tests.py): the variant of the campaign's test this message belongs to;
    # None for every other message, the rest of an A/B campaign's audience included.
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)


# An A/B campaign's message names in its headers the variant whose content it is sent with (the
# winner, for the rest of the audience): what the claimed row tells delivery, and the recipient's copy.
VARIANT_HEADER = "X-SmartMail-Variant"


def in_state(*states: MessageState):
    """`messages.state` in the given states, the values written into the SQL: a partial index below
    serves a query only when the database can see that the query's states imply the index's,
    which a bound parameter hides from a prepared statement's generic plan (and from SQLite)."""
    values: list = [literal_column(f"'{state.value}'") for state in states]
    return Message.state == values[0] if len(values) == 1 else Message.state.in_(values)


# A change of state cannot be a HOT update, so every index on messages gets a new entry for each
# state a row goes through. The indexes that find rows by state are therefore partial: a row is
# in one only while it is in the state that index serves, and finished rows (most of the table)
# are in none. They also keep the claim, which looks rows up by id, off them: a planner that still
# believes no row is queued would otherwise scan every queued entry on each claim.
WAITING = in_state(MessageState.DEFERRED, MessageState.SCHEDULED)
Index("ix_messages_waiting_next_attempt_at", Message.next_attempt_at, postgresql_where=WAITING, sqlite_where=WAITING)
QUEUED = in_state(MessageState.QUEUED)
Index("ix_messages_queued_enqueued_at", Message.enqueued_at, postgresql_where=QUEUED, sqlite_where=QUEUED)
SENDING = in_state(MessageState.SENDING)
Index("ix_messages_sending_claimed_at", Message.claimed_at, postgresql_where=SENDING, sqlite_where=SENDING)
# Unique among the messages that have a key. Partial, because most rows have none (campaign
# messages never do) and each of their versions would otherwise add a NULL entry to this index too.
HAS_KEY = Message.idempotency_key.isnot(None)
Index(
    "uq_messages_idempotency_key", Message.idempotency_key, unique=True, postgresql_where=HAS_KEY, sqlite_where=HAS_KEY
)
# One message per campaign and contact (a relaunch adds nothing); it also finds a campaign's rows.
OF_CAMPAIGNS = Message.campaign_id.isnot(None)
Index(
    "uq_messages_campaign_id_contact_id",
    Message.campaign_id,
    Message.contact_id,
    unique=True,
    postgresql_where=OF_CAMPAIGNS,
    sqlite_where=OF_CAMPAIGNS,
)


class Suppression(Base):
    __tablename__ = "suppressions"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)  # normalized (lower-case)
    reason: Mapped[str] = mapped_column(String(32))  # see audience.suppressions.Reason
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_message_id: Mapped[str | None] = mapped_column(String(26), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# --- Contacts, lists, segments, events and imports (issue 4) ------------------------------------
# Appended here so Base.metadata (and so Alembic) sees every table; see smartmail/contacts.py.

from sqlalchemy import ForeignKey  # noqa: E402
from sqlalchemy.dialects.postgresql import JSONB  # noqa: E402

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
_BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL: binary, indexable, and `||` merges objects in upserts.
_Json = JSON().with_variant(JSONB(), "postgresql")


class ContactStatus(str, enum.Enum):
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    BLOCKED = "blocked"

    def __str__(self) -> str:
        return self.value


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (Index("ix_contacts_status", "status"), Index("ix_contacts_created_at", "created_at"))

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # normalized: lower-case, IDN as A-label
    status: Mapped[str] = mapped_column(String(16), default=ContactStatus.SUBSCRIBED.value)
    attributes: Mapped[dict] = mapped_column(_Json, default=dict)
    timezone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    locale: Mapped[str | None] = mapped_column(String(35), nullable=True)
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_open_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_click_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # The import job that last wrote this row: how a job tells an address repeated later in its
    # file from one it has not seen, without holding every address of the file in memory.
    last_import_id: Mapped[str | None] = mapped_column(String(26), nullable=True)
    # The engagement score (issue 22; audience/engagement_score.py): the decayed sum of human opens
    # and clicks as of the latest one read, and its log-space key, which segments compare against.
    engagement_score: Mapped[float | None] = mapped_column(Double, nullable=True)
    engagement_scored_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    engagement_key: Mapped[float | None] = mapped_column(Double, nullable=True)


class ContactList(Base):
    __tablename__ = "lists"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ListMembership(Base):
    __tablename__ = "list_memberships"
    __table_args__ = (Index("ix_list_memberships_contact_id", "contact_id"),)

    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True)
    contact_id: Mapped[int] = mapped_column(_BigId, ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="subscribed")  # subscribed | unsubscribed
    joined_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)  # api | cli | import:<job id> | …


# A workflow triggered by joining a list finds who joined since its last look.
Index("ix_list_memberships_list_id_joined_at", ListMembership.list_id, ListMembership.joined_at)


class EventType(str, enum.Enum):
    """The event types SmartMail itself records (docs/events.md); custom events carry the application's names."""

    SENT = "sent"  # the relay accepted the message
    DEFERRED = "deferred"  # the relay answered 4xx (or no answer): retried later
    FAILED = "failed"  # 5xx, or too old to retry
    OPENED = "opened"  # the open pixel was fetched
    CLICKED = "clicked"  # a tracked link was followed
    UNSUBSCRIBED = "unsubscribed"  # by link, one-click POST, API or CLI
    BOUNCED = "bounced"  # a DSN or provider notification: {kind: hard|soft, status, diagnostic, source}
    COMPLAINED = "complained"  # an ARF report or provider notification: the recipient marked it as spam
    CAMPAIGN_PAUSED = "campaign_paused"  # paused by its complaint or bounce rate: {reason, rate, threshold}
    WEBHOOK_ENDPOINT_DISABLED = "webhook_endpoint_disabled"  # 410 Gone, or failing too long: {endpoint_id, reason}

    def __str__(self) -> str:
        return self.value


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        # Segments ask "which contacts had a (human) event of type T since S": an index-only range scan.
        Index("ix_events_type_machine_occurred_at_contact_id", "type", "machine", "occurred_at", "contact_id"),
        # A contact's own history, and the cascade when a contact is erased.
        Index("ix_events_contact_id_type_occurred_at", "contact_id", "type", "occurred_at"),
        Index("ix_events_message_id", "message_id"),
        Index("ix_events_xact_id", "xact", "id"),  # the stream's order
        # Ids never handed out twice (SQLite would reuse the highest after a delete): a reader's
        # position must never name a new row it already passed.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64))  # an EventType, or a custom name such as order_placed
    contact_id: Mapped[int | None] = mapped_column(_BigId, ForeignKey("contacts.id", ondelete="CASCADE"), nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(26), nullable=True)
    campaign_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    properties: Mapped[dict] = mapped_column(_Json, default=dict)
    occurred_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # The sender's own id for a custom event (a CRM's or shop's): ingesting it twice stores it once.
    client_event_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # An open by a privacy proxy, a click by a link scanner: kept, and left out of KPIs and segments.
    machine: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    xact: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=current_transaction())


_HAS_CLIENT_ID = Event.client_event_id.isnot(None)
Index(
    "ix_events_client_event_id",
    Event.client_event_id,
    unique=True,
    postgresql_where=_HAS_CLIENT_ID,
    sqlite_where=_HAS_CLIENT_ID,
)


class EngagementFirst(Base):
    """The first open of a message and the first click of each of its links, human and machine
    apart: the row that makes an `opened` or `clicked` event the unique one."""

    __tablename__ = "engagement_firsts"

    message_id: Mapped[str] = mapped_column(String(26), primary_key=True)
    link: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0: the open; n: the message's link n
    machine: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime)


class FeedbackMark(Base):
    """One mark per effect applied (`<message id>:<event type>`, or the provider's report id and
    the address when no message is known): a duplicate or replayed report finds its mark and
    changes nothing."""

    __tablename__ = "feedback_marks"
    __table_args__ = (Index("ix_feedback_marks_created_at", "created_at"),)  # retention

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class InboundState(str, enum.Enum):
    PENDING = "pending"  # stored and acknowledged; the events worker has not processed it yet
    PROCESSED = "processed"
    FAILED = "failed"  # processing raised on every attempt; kept for an operator to look at

    def __str__(self) -> str:
        return self.value


class InboundMessage(Base):
    """Mail `smartmail inbound` accepted (DSNs, ARF reports, mailto unsubscribes): stored before the
    SMTP reply, processed afterwards by the events worker, so a crash loses nothing."""

    __tablename__ = "inbound_messages"

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=InboundState.PENDING.value)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    peer: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the client's address
    mail_from: Mapped[str] = mapped_column(String(320))
    recipients: Mapped[list] = mapped_column(JSON, default=list)  # the envelope's RCPT TO addresses
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)  # bounce, complaint, … (feedback.classify)
    outcome: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # what processing found and did


_INBOUND_PENDING = InboundMessage.state == literal_column("'pending'")
Index(
    "ix_inbound_messages_pending_received_at",
    InboundMessage.received_at,
    postgresql_where=_INBOUND_PENDING,
    sqlite_where=_INBOUND_PENDING,
)


class StreamCheckpoint(Base):
    """How far a reader of a stream got: written in the transaction that stores what it read, so a
    crash never loses or repeats a read (the tracking drain's Redis stream id; later consumers'
    event stream positions)."""

    __tablename__ = "stream_checkpoints"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[str] = mapped_column(String(100))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Segment(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    rules: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ImportJob(Base):
    __tablename__ = "import_jobs"

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | running | done | failed
    path: Mapped[str] = mapped_column(Text)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # format, mode, mapping, types, list, …
    list_id: Mapped[int | None] = mapped_column(ForeignKey("lists.id", ondelete="SET NULL"), nullable=True)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    # Checkpoint: every row up to here is committed, with its errors, in the same transaction.
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[int] = mapped_column(BigInteger, default=0)
    updated: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)  # exists (create only) / missing (update only)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ImportRowError(Base):
    """One bad row of an import: the downloadable error report is made from these."""

    __tablename__ = "import_errors"

    job_id: Mapped[str] = mapped_column(String(26), ForeignKey("import_jobs.id", ondelete="CASCADE"), primary_key=True)
    row: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # 1 = first data row (line after the header)
    field: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    value: Mapped[str | None] = mapped_column(Text, nullable=True)  # the offending value, truncated


# --- Campaigns (issue 5) -----------------------------------------------------------------------


class CampaignState(str, enum.Enum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    SENDING = "sending"  # launched: fanning out and/or delivering
    PAUSED = "paused"
    SENT = "sent"  # every message reached a final state
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Campaign(Base):
    __tablename__ = "campaigns"
    __table_args__ = (Index("ix_campaigns_state_send_at", "state", "send_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=CampaignState.DRAFT.value)
    template_name: Mapped[str] = mapped_column(String(200))
    # The template as it was at launch: later edits to the template do not change a campaign.
    subject: Mapped[str | None] = mapped_column(Text, nullable=True)
    html: Mapped[str | None] = mapped_column(Text, nullable=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    template_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lists: Mapped[list] = mapped_column(JSON, default=list)  # list names
    segment: Mapped[str | None] = mapped_column(String(200), nullable=True)  # a saved segment's name
    sender: Mapped[str] = mapped_column(String(320))
    reply_to: Mapped[str | None] = mapped_column(String(320), nullable=True)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    send_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    window_start: Mapped[str | None] = mapped_column(String(5), nullable=True)  # "08:00", recipient's time zone
    window_end: Mapped[str | None] = mapped_column(String(5), nullable=True)
    window_timezone: Mapped[str] = mapped_column(String(64), default="UTC")  # for contacts without one
    rate_cap: Mapped[float | None] = mapped_column(Float, nullable=True)  # messages per second, campaign-wide
    # At-least-once: messages a crash left `unknown` are sent again (a duplicate is possible).
    resend_unknown: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    # Open and click tracking (on unless turned off), and the UTM parameters added to tracked links.
    tracking: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True, server_default=true())
    utm: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    preheader: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Deliverability feedback counted as it arrives (each report once), and why it paused itself.
    hard_bounces: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    soft_bounces: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    complaints: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    paused_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Fan-out checkpoint: every audience contact up to this id has its message row.
    cursor: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), default=0)
    fanned_out: Mapped[bool] = mapped_column(default=False)
    # The fan-out's lease, renewed with each page: a fan-out not heard from by then was lost with
    # its worker (Redis would redeliver its task only after the visibility timeout), so beat starts
    # another, which resumes at the checkpoint.
    fan_out_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    fan_out_owner: Mapped[str | None] = mapped_column(String(26), nullable=True)  # the current run's token
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    launched_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # An A/B test (campaigns/ab_tests.py): its settings and seed (SQL NULL: none), each variant's
    # content frozen at launch, when the winner is due, and the winner once picked.
    ab_test: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    ab_frozen: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    ab_decide_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    ab_winner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ab_decided_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ApiKey(Base):
    """An HTTP API key: shown once as `sm_<id>_<secret>`; only the secret's SHA-256 is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public: the key's name in logs and URLs
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of the secret part
    scopes: Mapped[list] = mapped_column(JSON, default=list)
    rate_limit: Mapped[float | None] = mapped_column(Float, nullable=True)  # requests/s; None: the setting
    burst: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the setting
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WebhookEndpoint(Base):
    """A subscriber's URL and what it receives; its deliveries wait in `webhook_deliveries`."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    event_types: Mapped[list | None] = mapped_column(JSON, nullable=True)  # None: every type
    campaign_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)  # None: any campaign or none
    tags: Mapped[list | None] = mapped_column(JSON, nullable=True)  # None: any; else a message tag in common
    # `whsec_…` secrets, encrypted with a key derived from SMARTMAIL_SECRET_KEY: a database dump
    # alone cannot forge deliveries. During a rotation the previous one signs too, until it expires.
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    rate_limit: Mapped[float | None] = mapped_column(Float, nullable=True)  # requests/s; None: unlimited
    max_in_flight: Mapped[int] = mapped_column(Integer, nullable=False, default=10)  # concurrent requests
    batch_size: Mapped[int] = mapped_column(Integer, nullable=False, default=1)  # events per request
    # The stream position when the endpoint was created: it receives only later events.
    start_position: Mapped[str] = mapped_column(String(41), nullable=False, default="0-0")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    failing_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # first failure since a success
    consecutive_failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    circuit_open_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # no requests until then
    circuit_pause: Mapped[float | None] = mapped_column(Float, nullable=True)  # its last pause, in seconds
    paced_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # rate limit: the next request
    # The sending lease: one drain per endpoint at a time, renewed every round; a lapsed one died.
    drain_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    drain_owner: Mapped[str | None] = mapped_column(String(26), nullable=True)


class WebhookDeliveryState(str, enum.Enum):
    PENDING = "pending"  # waiting for its next attempt (next_attempt_at)
    SUCCEEDED = "succeeded"  # the endpoint answered 2xx
    FAILED = "failed"  # every attempt of the retry schedule failed; replayable

    def __str__(self) -> str:
        return self.value


class WebhookDelivery(Base):
    """One event for one endpoint: exactly one row per (endpoint, event), its retry state in the row."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        Index("ix_webhook_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),  # replays
        Index("ix_webhook_deliveries_created_at", "created_at"),  # retention
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # None: a test delivery
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the event as sent: {"type", "timestamp", "data"}
    # The `webhook-id` header, stable across retries: the receiver's dedupe key. Batched endpoints
    # get one per request, given at its first attempt and kept by every event in it.
    webhook_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=WebhookDeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)  # since created or replayed
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


_DELIVERY_PENDING = WebhookDelivery.state == literal_column("'pending'")
Index(
    "ix_webhook_deliveries_pending",
    WebhookDelivery.endpoint_id,
    WebhookDelivery.next_attempt_at,
    WebhookDelivery.id,
    postgresql_where=_DELIVERY_PENDING,
    sqlite_where=_DELIVERY_PENDING,
)


class WebhookAttempt(Base):
    """One HTTP request of a delivery: when, the answer (or the error), how long, and the answer's start."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        Index("ix_webhook_attempts_delivery_id", "delivery_id"),
        Index("ix_webhook_attempts_attempted_at", "attempted_at"),  # retention
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(BigInteger)
    endpoint_id: Mapped[int] = mapped_column(Integer)
    webhook_id: Mapped[str] = mapped_column(String(40))
    attempted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: no HTTP answer (see error)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[int] = mapped_column(Integer)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)  # the body's first bytes, as text


# --- Automations (issue 22) ----------------------------------------------------------------------


class WorkflowState(str, enum.Enum):
    ACTIVE = "active"  # enrols contacts and advances its enrolments
    PAUSED = "paused"  # enrols nobody; its enrolments are held where they are

    def __str__(self) -> str:
        return self.value


class Workflow(Base):
    """An automation: its name, state and current version; each saved definition is a WorkflowVersion."""

    __tablename__ = "workflows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=WorkflowState.ACTIVE.value)
    version: Mapped[int] = mapped_column(Integer, default=1)  # the version new enrolments get
    # Beat's triggers (list join, segment entry, a date, no open) look at what changed since here.
    scanned_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WorkflowVersion(Base):
    """A workflow's definition as saved: never changed, so running enrolments finish on theirs."""

    __tablename__ = "workflow_versions"
    __table_args__ = (UniqueConstraint("workflow_id", "version", name="uq_workflow_versions_workflow_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EnrolmentState(str, enum.Enum):
    ACTIVE = "active"  # its current step runs at due_at (a wait's end, or at once)
    HELD = "held"  # its workflow is paused: it stays at its step until resumed
    ENDED = "ended"  # finished; ended_reason says how

    def __str__(self) -> str:
        return self.value


class Enrolment(Base):
    """One contact's way through one workflow version: where it is, when its step is due, how it ended."""

    __tablename__ = "enrolments"
    __table_args__ = (
        # The entry rule's key (`once`, an event id, a date…): a contact enters once per key.
        UniqueConstraint("workflow_id", "contact_id", "entry_key", name="uq_enrolments_workflow_contact_entry"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    contact_id: Mapped[int] = mapped_column(_BigId, ForeignKey("contacts.id", ondelete="CASCADE"))
    entry_key: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(16), default=EnrolmentState.ACTIVE.value)
    step: Mapped[str] = mapped_column(String(100))  # the step that runs next
    due_at: Mapped[datetime] = mapped_column(DateTime)
    # Steps run so far: each run's row in workflow_step_runs is keyed by it, so no step runs twice.
    runs: Mapped[int] = mapped_column(Integer, default=0)
    # A wait for an event: its type, and when one came (the event reader sets it and makes the step due).
    awaiting: Mapped[str | None] = mapped_column(String(64), nullable=True)
    wait_started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # earlier events do not count
    awaited_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_message_id: Mapped[str | None] = mapped_column(String(26), nullable=True)  # the previous email
    context: Mapped[dict] = mapped_column(JSON, default=dict)  # the trigger event's properties
    entered_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # completed | converted (the goal) | exited (an exit step) | unsubscribed | suppressed | removed
    ended_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)


# Only due-able rows are in the due index: a million enrolments waiting cost a tick nothing but
# the index range that is due.
_ENROLMENT_ACTIVE = Enrolment.state == literal_column("'active'")
Index(
    "ix_enrolments_active_due_at",
    Enrolment.due_at,
    Enrolment.id,
    postgresql_where=_ENROLMENT_ACTIVE,
    sqlite_where=_ENROLMENT_ACTIVE,
)
# Goals, awaited events and unsubscribes find a contact's running enrolments.
_ENROLMENT_RUNNING = Enrolment.state != literal_column("'ended'")
Index(
    "ix_enrolments_running_contact_id",
    Enrolment.contact_id,
    postgresql_where=_ENROLMENT_RUNNING,
    sqlite_where=_ENROLMENT_RUNNING,
)
Index("ix_enrolments_workflow_id_state_step", Enrolment.workflow_id, Enrolment.state, Enrolment.step)


class StepRun(Base):
    """One step run for one enrolment: what it did (the message it sent, the branch it took)."""

    __tablename__ = "workflow_step_runs"
    __table_args__ = (
        Index("ix_workflow_step_runs_contact_id_ran_at", "contact_id", "ran_at"),  # the frequency cap
        Index("ix_workflow_step_runs_message_id", "message_id"),  # "opened the email of step S"
    )

    enrolment_id: Mapped[int] = mapped_column(_BigId, ForeignKey("enrolments.id", ondelete="CASCADE"), primary_key=True)
    run: Mapped[int] = mapped_column(Integer, primary_key=True)  # the enrolment's `runs` when it ran
    workflow_id: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(16))  # the step's type
    contact_id: Mapped[int] = mapped_column(_BigId)
    ran_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    message_id: Mapped[str | None] = mapped_column(String(26), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(200), nullable=True)  # a branch's way, a hold's reason


class SegmentPresence(Base):
    """Contacts found in a workflow's trigger segment at its last evaluation: entering is being
    found without a row here."""

    __tablename__ = "workflow_segment_presence"

    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"), primary_key=True)
    contact_id: Mapped[int] = mapped_column(_BigId, ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)


# --- Engagement score (issue 22) ---

# `{"engagement_score": {"gte": X}}` is one range scan of this index (segments.py).
Index("ix_contacts_engagement_key", Contact.engagement_key)


# --- Analytics roll-ups (issue 23) ---


class Rollup(Base):
    """One counter of the event stream's roll-ups: how many `metric` events happened in the hour or
    day from `bucket_start` (UTC) for one value of a dimension (a campaign's id, a recipient domain,
    or "" for all). One row per counter, not a wide row: a new metric or dimension adds rows, not
    columns, and a bucket without an event of a kind has no row for it."""

    __tablename__ = "rollups"

    # Leading with the dimension's value: a campaign's KPIs, a domain's trend, are one range of the key.
    dimension: Mapped[str] = mapped_column(String(16), primary_key=True)  # campaign | domain | all
    value: Mapped[str] = mapped_column(String(320), primary_key=True)
    granularity: Mapped[str] = mapped_column(String(8), primary_key=True)  # hour | day
    bucket_start: Mapped[datetime] = mapped_column(DateTime, primary_key=True)
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Conversion(Base):
    """A message converted: the first goal event (in stream order) of its contact within the window
    after a human click of it. The row makes a message count as converted once, however many goal
    events follow the click."""

    __tablename__ = "conversions"
    __table_args__ = (Index("ix_conversions_converted_at", "converted_at"),)  # a rebuild from a day on

    message_id: Mapped[str] = mapped_column(String(26), primary_key=True)
    event_id: Mapped[int] = mapped_column(_BigId)  # the goal event
    converted_at: Mapped[datetime] = mapped_column(DateTime)  # the goal event's occurred_at
