"""MIME building: a stored message row becomes the RFC 5322 bytes handed to a transport."""
from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from datetime import datetime, timezone


def build_mime(*, sender: str, recipient: str, subject: str, text: str, html: str | None,
               message_id: str, reply_to: str | None = None, headers: dict[str, str] | None = None,
               date: datetime | None = None) -> bytes:
    """multipart/alternative (text first, HTML last, as RFC 2046 section 5.1.4 orders by preference)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime.now(timezone.utc))
    msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()
