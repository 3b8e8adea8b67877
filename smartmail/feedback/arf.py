"""RFC 5965 abuse reports (ARF): the `message/feedback-report` part of a feedback loop's complaint."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses

from smartmail.feedback import mime_text

REPORT_TYPE = "message/feedback-report"
# Feedback types that are not a complaint about the message: RFC 6430 `not-spam` (the recipient
# took it out of the spam folder) and RFC 6591 `auth-failure` (a DKIM/SPF/DMARC failure report).
# Everything else (abuse, fraud, virus, other, and types not known yet, which RFC 5965 section 7.3
# asks to treat as `other`) is a complaint.
NOT_COMPLAINTS = frozenset({"not-spam", "auth-failure"})


@dataclass(frozen=True)
class FeedbackReport:
    """The fields of a feedback report (RFC 5965 section 3.5) that name the complaint's subject."""

    feedback_type: str  # lower-case; "" when missing
    original_rcpt_to: str | None  # the envelope recipient the provider saw, lower-case
    original_mail_from: str | None  # the envelope sender (our VERP return path, when the provider kept it)
    user_agent: str | None


def report_part(message: Message) -> Message | None:
    """The feedback-report part, wherever it is in the tree."""
    return mime_text.first_part(message, (REPORT_TYPE,))


def read(part: Message) -> FeedbackReport:
    """The report's fields. The stdlib parses `message/feedback-report` as a message whose headers
    are the fields; a report that did not parse that way is read as a header block."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        fields = payload[0]
    else:
        fields = HeaderParser().parsestr(mime_text.body_text(part))
    return FeedbackReport(
        feedback_type=mime_text.header(fields, "Feedback-Type").strip().lower(),
        original_rcpt_to=address_in(mime_text.header(fields, "Original-Rcpt-To")),
        original_mail_from=address_in(mime_text.header(fields, "Original-Mail-From")),
        user_agent=mime_text.header(fields, "User-Agent").strip() or None,
    )


def address_in(value: str) -> str | None:
    """The first address of an address field (`Name <a@b>`, `<a@b>`, `a@b`), lower-case, or None."""
    if "@" not in value:
        return None
    try:
        for _name, address in getaddresses([value]):
            if "@" in address:
                return address.strip().lower()
    except Exception:  # getaddresses on hostile input: no address, rather than an error
        return None
    return None
