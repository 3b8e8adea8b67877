"""SQLAlchemy models: templates (versioned), messages (one row per email, the source of truth), suppressions."""
from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from smartmail.db import utcnow


class Base(DeclarativeBase):
    pass


class MessageState(str, enum.Enum):
    """A message's life; see DESIGN.md. Every change is a conditional UPDATE on the current state."""

    SCHEDULED = "scheduled"   # send_at in the future; beat queues it when due
    QUEUED = "queued"         # a task for it is (or should be) in Redis
    SENDING = "sending"       # claimed by a worker; SMTP transaction under way
    SENT = "sent"             # the relay answered 2xx to DATA
    DEFERRED = "deferred"     # 4xx / connection error; retried at next_attempt_at
    FAILED = "failed"         # 5xx, or deferred past the maximum age
    SUPPRESSED = "suppressed" # recipient on the suppression list; never sent
    UNKNOWN = "unknown"       # worker died while sending; not re-sent automatically

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
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_messages_state_enqueued_at", "state", "enqueued_at"),
        Index("ix_messages_state_claimed_at", "state", "claimed_at"),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
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
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    send_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # when scheduled for later
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    smtp_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    smtp_reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Suppression(Base):
    __tablename__ = "suppressions"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)  # normalized (lower-case)
    reason: Mapped[str] = mapped_column(String(32))  # hard_bounce | unsubscribed | complaint | manual
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_message_id: Mapped[str | None] = mapped_column(String(26), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
