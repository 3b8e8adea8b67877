"""RFC 3464 delivery status notifications: the per-recipient blocks of a `message/delivery-status` part."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser

from smartmail.feedback import mime_text

# RFC 3464 section 2.1.2 and RFC 6533 section 6.1 (the UTF-8 form, `message/global-delivery-status`).
REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
DIAGNOSTIC_MAX = 1000
_BLOCKS = re.compile(r"\r?\n[ \t]*\r?\n")
_MAX_BLOCKS = 1000  # a report about more recipients than any relay sends in one DSN is cut here


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block (RFC 3464 section 2.3): what happened to one recipient."""

    action: str  # failed | delayed | delivered | relayed | expanded (lower-case; "" when missing)
    recipient: str | None  # Original-Recipient, else Final-Recipient: the address, lower-case
    status: str | None  # the Status field as given, e.g. "5.1.1"
    diagnostic: str | None  # the Diagnostic-Code text after its type ("smtp;"), unfolded and capped


def report_part(message: Message) -> Message | None:
    """The delivery-status part, wherever it is."""
    return mime_text.first_part(message, REPORT_TYPES)


def recipient_statuses(part: Message) -> list[RecipientStatus]:
    """The per-recipient blocks of a delivery-status part (the per-message block, first, is skipped:
    it has no Action). Blocks without an Action field are not per-recipient and are skipped too."""
    statuses = []
    for block in _blocks(part):
        action = mime_text.header(block, "Action").strip().lower()
        if not action:
            continue
        # Original-Recipient first: it is the address as the sender gave it (RFC 3464 section 2.3.1),
        # our contact's; Final-Recipient is the one the reporting MTA tried, after any forwarding.
        recipient = _address(mime_text.header(block, "Original-Recipient")) or _address(
            mime_text.header(block, "Final-Recipient")
        )
        diagnostic = _typed_value(mime_text.header(block, "Diagnostic-Code"))
        statuses.append(
            RecipientStatus(
                action=action.split()[0].rstrip(";"),
                recipient=recipient,
                status=mime_text.header(block, "Status").strip() or None,
                diagnostic=" ".join(diagnostic.split())[:DIAGNOSTIC_MAX] or None,
            )
        )
    return statuses


def _blocks(part: Message) -> Iterator[Message]:
    """Header blocks of the report body. The stdlib parses `message/delivery-status` into a list of
    them; `message/global-delivery-status` comes back as one message whose body holds the others."""
    payload = part.get_payload()
    items = payload if isinstance(payload, list) else []
    if isinstance(payload, str) and payload.strip():
        items = [HeaderParser().parsestr(mime_text.body_text(part))]
    count = 0
    for item in items:
        if not isinstance(item, Message):
            continue
        yield item
        count += 1
        # body_text, not get_payload(): RFC 6533 blocks hold raw UTF-8, which get_payload() reads as ASCII.
        rest = mime_text.body_text(item)
        if rest.strip():
            for text in _BLOCKS.split(rest.strip()):
                if count >= _MAX_BLOCKS:
                    return
                yield HeaderParser().parsestr(text.strip() + "\n")
                count += 1
        if count >= _MAX_BLOCKS:
            return


def _typed_value(value: str) -> str:
    """`type; value` (RFC 3464 section 2.1.2, e.g. `rfc822; a@b` or `smtp; 550 …`) → value."""
    kind, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon and " " not in kind.strip() else value.strip()


def _address(value: str) -> str | None:
    address = _typed_value(value).strip().strip("<>").strip().lower()
    return address if "@" in address else None
