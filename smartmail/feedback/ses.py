"""Amazon SES notifications (bounce, complaint, delivery) read into findings, whichever way SES published them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any

from smartmail.content.return_path import message_of
from smartmail.feedback.dsn import DIAGNOSTIC_MAX
from smartmail.feedback.findings import Finding, Kind
from smartmail.feedback.mime_text import our_message_id

SOURCE = "ses"
# bounce.bounceType (SES developer guide, "Amazon SES notification contents"): Permanent means
# the address will not take mail; Transient and Undetermined may yet succeed.
_BOUNCE_KINDS = {"Permanent": Kind.HARD_BOUNCE, "Transient": Kind.SOFT_BOUNCE, "Undetermined": Kind.SOFT_BOUNCE}
# SES did not send because the address is on a suppression list, the account's (OnAccountSuppressionList)
# or SES's global one (Suppressed), for an earlier bounce or complaint (same guide, bounce and complaint
# subtypes): still an address to suppress, but no bounce or complaint caused by this campaign.
_SUPPRESSED_BOUNCES = frozenset({"OnAccountSuppressionList", "Suppressed"})
_SUPPRESSED_COMPLAINTS = frozenset({"OnAccountSuppressionList"})


@dataclass(frozen=True)
class Notification:
    """What one SES notification says: its type (`Bounce`, `Complaint`, `Delivery`, or another that
    we ignore: `Send`, `Open`, …, or `` for a message that is no SES notification) and its findings."""

    type: str
    findings: list[Finding] = field(default_factory=list)
    ses_message_id: str | None = None  # SES's own id of the original message (mail.messageId)


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _address(value: Any) -> str | None:
    """The bare address, lower-case (SES may give `Name <address>`)."""
    text = _text(value)
    if text is None:
        return None
    address = parseaddr(text)[1] or text
    return address.strip().lower() or None


def message_id(mail: Mapping[str, Any]) -> str | None:
    """SmartMail's id of the original message: from a VERP return path (signed, so trusted first),
    else from the Message-ID SmartMail set (SES keeps it in mail.headers and mail.commonHeaders)."""
    headers: dict[str, str] = {}
    for header in _list(mail.get("headers")):
        name, value = _text(header.get("name")), _text(header.get("value"))
        if name and value:
            headers.setdefault(name.lower(), value)
    for candidate in (_text(mail.get("source")), headers.get("return-path")):
        if candidate and (found := message_of(candidate)):
            return found
    common = _dict(mail.get("commonHeaders"))
    for candidate in (headers.get("message-id"), _text(common.get("messageId"))):
        if candidate and (found := our_message_id(candidate)):
            return found
    return None


def _diagnostic(value: Any) -> str | None:
    text = _text(value)
    return text[:DIAGNOSTIC_MAX] if text else None


def _bounce(bounce: Mapping[str, Any], message: str | None) -> list[Finding]:
    kind = _BOUNCE_KINDS.get(bounce.get("bounceType"), Kind.SOFT_BOUNCE)  # type: ignore[arg-type]
    sub_type = _text(bounce.get("bounceSubType"))
    return [
        Finding(
            kind=kind,
            source=SOURCE,
            recipient=_address(recipient.get("emailAddress")),
            message_id=message,
            status=_text(recipient.get("status")),
            diagnostic=_diagnostic(recipient.get("diagnosticCode")),
            feedback_type=sub_type,
            reference=_text(bounce.get("feedbackId")),
            counts_for_campaign=sub_type not in _SUPPRESSED_BOUNCES,
        )
        for recipient in _list(bounce.get("bouncedRecipients"))
        if _address(recipient.get("emailAddress"))
    ]


def _complaint(complaint: Mapping[str, Any], message: str | None) -> list[Finding]:
    # complaintFeedbackType is the ARF Feedback-Type when the provider's report had one;
    # complaintSubType `OnAccountSuppressionList` when SES did not send to a past complainer.
    feedback_type = _text(complaint.get("complaintFeedbackType")) or _text(complaint.get("complaintSubType"))
    return [
        Finding(
            kind=Kind.COMPLAINT,
            source=SOURCE,
            recipient=_address(recipient.get("emailAddress")),
            message_id=message,
            feedback_type=feedback_type,
            reference=_text(complaint.get("feedbackId")),
            counts_for_campaign=_text(complaint.get("complaintSubType")) not in _SUPPRESSED_COMPLAINTS,
        )
        for recipient in _list(complaint.get("complainedRecipients"))
        if _address(recipient.get("emailAddress"))
    ]


def _delivery(delivery: Mapping[str, Any], message: str | None, reference: str | None) -> list[Finding]:
    recipients = delivery.get("recipients")
    return [
        Finding(
            kind=Kind.DELIVERED,
            source=SOURCE,
            recipient=_address(recipient),
            message_id=message,
            diagnostic=_diagnostic(delivery.get("smtpResponse")),
            reference=reference,
        )
        for recipient in (recipients if isinstance(recipients, list) else [])
        if _address(recipient)
    ]


def read(message: str | Mapping[str, Any]) -> Notification:
    """The findings of an SNS Notification's Message: an SES notification (`notificationType`, from a
    topic set on the identity) or event (`eventType`, from a configuration set's event destination).
    Anything else (SES's test message, an event type we do not use) is a Notification with no findings."""
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except ValueError:
            return Notification(type="")
    if not isinstance(message, Mapping):
        return Notification(type="")
    kind = _text(message.get("notificationType")) or _text(message.get("eventType")) or ""
    mail = _dict(message.get("mail"))
    ours = message_id(mail)
    ses_id = _text(mail.get("messageId"))
    if kind == "Bounce":
        findings = _bounce(_dict(message.get("bounce")), ours)
    elif kind == "Complaint":
        findings = _complaint(_dict(message.get("complaint")), ours)
    elif kind == "Delivery":
        findings = _delivery(_dict(message.get("delivery")), ours, ses_id)
    else:
        findings = []
    return Notification(type=kind, findings=findings, ses_message_id=ses_id)
