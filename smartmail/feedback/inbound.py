"""Inbound mail: the spool `smartmail inbound` writes before it answers, and the events worker's processing of it."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from smartmail.store.engine import session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import InboundMessage, InboundState

log = structlog.get_logger("smartmail.inbound")

PROCESS_TASK = "smartmail.inbound.process"


def spool(mail_from: str, recipients: Sequence[str], raw: bytes, peer: str | None = None) -> str:
    """Store one accepted mail (committed when this returns, before the SMTP reply); its id."""
    inbound_id = new_id()
    with session_scope() as session:
        session.add(
            InboundMessage(
                id=inbound_id,
                state=InboundState.PENDING.value,
                received_at=utcnow(),
                peer=peer,
                mail_from=mail_from[:320],
                recipients=list(recipients),
                raw=raw,
                attempts=0,
            )
        )
    return inbound_id
