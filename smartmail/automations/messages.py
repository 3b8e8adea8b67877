"""A send step's email: rendered for the contact, with unsubscribe link and headers, keyed by its step run."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from smartmail.addresses import parse_mailbox
from smartmail.config import get_settings
from smartmail.content import rendering, tracking_links
from smartmail.content.tracking_links import TRACKING_OPT_OUT
from smartmail.content.unsubscribe_links import (
    list_unsubscribe_headers,
    make_token,
    unsubscribe_url,
    with_unsubscribe_link,
)
from smartmail.store.models import MessageState


def idempotency_key(enrolment_id: int, run: int) -> str:
    """One message per step run: a retried advance that somehow ran the step again stores nothing new."""
    return f"workflow:{enrolment_id}:{run}"


def message_row(
    connection,
    *,
    message_id: str,
    enrolment_id: int,
    run: int,
    workflow: str,
    step: dict[str, Any],
    sender: str | None,
    contact: Any,
    context: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """The messages row of one send step for one contact (a row with id, email, attributes):
    queued, rendered now from the step's template and the contact's attributes plus the trigger
    event's properties (`event`). TemplateError/ValueError when the template cannot render."""
    settings = get_settings()
    token = make_token(contact.id, None)
    url = unsubscribe_url(token)
    attributes = contact.attributes or {}
    rendered = rendering.render(
        connection,
        context={**attributes, "email": contact.email, "unsubscribe_url": url, "event": context, "workflow": workflow},
        template=step["template"],
        templates_dir=settings.templates_dir,
        cache_seconds=settings.template_cache_seconds,
    )
    html, text = with_unsubscribe_link(rendered.html, rendered.text, url)
    if step.get("track", True) and not attributes.get(TRACKING_OPT_OUT):
        html, text = tracking_links.track(
            html, text, message_id=message_id, skip=(url,), honeypot=settings.track_honeypot
        )
    reply_to = step.get("reply_to")
    return {
        "id": message_id,
        "idempotency_key": idempotency_key(enrolment_id, run),
        "state": MessageState.QUEUED.value,
        "sender": str(parse_mailbox(step.get("from") or sender or settings.default_sender)),
        "recipient": contact.email,
        "reply_to": reply_to,
        "subject": rendered.subject,
        "html": html,
        "text": text,
        "headers": {
            **list_unsubscribe_headers(contact.id, None, token=token),
            "X-SmartMail-Contact": str(contact.id),
            "X-SmartMail-Workflow": workflow,
        },
        "tags": [f"workflow:{workflow}", *step.get("tags", [])],
        "message_id_header": f"<{message_id}@{settings.sender_domain}>",
        "template_name": rendered.template_name,
        "template_version": rendered.template_version,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
        "next_attempt_at": None,
        "claimed_at": None,
        "finished_at": None,
        "smtp_code": None,
        "smtp_reply": None,
        "reason": None,
        "send_at": None,
        "contact_id": contact.id,
    }
