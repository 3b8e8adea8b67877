"""A branch's condition, evaluated for many enrolments at once: one query per leaf, not per contact."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from smartmail.audience import segments
from smartmail.store.models import Contact, Event


@dataclass(frozen=True)
class Subject:
    """What a condition looks at: the enrolment's contact and the email its last send step sent."""

    enrolment_id: int
    contact_id: int
    last_message_id: str | None


def holding(connection: Connection, condition: dict[str, Any], subjects: Sequence[Subject], now: datetime) -> set[int]:
    """The enrolment ids among `subjects` for which `condition` (definitions._condition's shape) holds."""
    ((kind, inner),) = condition.items()
    everyone = {subject.enrolment_id for subject in subjects}
    if kind == "all":
        found = everyone
        for part in inner:
            found &= holding(connection, part, [s for s in subjects if s.enrolment_id in found], now)
        return found
    if kind == "any":
        found = set()
        for part in inner:
            found |= holding(connection, part, [s for s in subjects if s.enrolment_id not in found], now)
        return found
    if kind == "not":
        return everyone - holding(connection, inner, subjects, now)
    if kind == "previous_email":
        return _engaged(connection, inner, subjects)
    if kind == "rules":
        return _in_segment(connection, inner, subjects, now)
    raise AssertionError(kind)


def _engaged(connection: Connection, event_type: str, subjects: Sequence[Subject]) -> set[int]:
    """Subjects whose previous email was opened (or clicked) by a person: machine opens (privacy
    proxies) and link scanners' clicks do not count."""
    sent = {subject.last_message_id for subject in subjects if subject.last_message_id}
    if not sent:
        return set()
    engaged = set(
        connection.scalars(
            select(Event.message_id)
            .where(Event.message_id.in_(sorted(sent)), Event.type == event_type, Event.machine.is_(False))
            .distinct()
        )
    )
    return {subject.enrolment_id for subject in subjects if subject.last_message_id in engaged}


def _in_segment(connection: Connection, rules: Any, subjects: Sequence[Subject], now: datetime) -> set[int]:
    contact_ids = sorted({subject.contact_id for subject in subjects})
    inside = set(
        connection.scalars(
            select(Contact.id).where(Contact.id.in_(contact_ids), segments.compile_where(rules, connection, now))
        )
    )
    return {subject.enrolment_id for subject in subjects if subject.contact_id in inside}
