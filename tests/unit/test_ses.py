"""SES notifications to findings: bounce, complaint and delivery, as feedback notifications and as published events."""

from __future__ import annotations

import json

import pytest

from smartmail import runtime
from smartmail.content.return_path import bounce_address
from smartmail.feedback import dsn, ses
from smartmail.feedback.findings import Finding, Kind

MESSAGE_ID = "01JF3Z8M2T6QK4V7W9XBCDEFGH"


@pytest.fixture(autouse=True)
def env(settings_env):
    return settings_env


def mail(message_id: str | None = MESSAGE_ID, *, source: str = "news@example.com", headers: bool = True) -> dict:
    """The `mail` object of an SES notification (SES developer guide, "Amazon SES notification contents")."""
    value = {
        "timestamp": "2026-12-04T11:58:02.519Z",
        "source": source,
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/example.com",
        "sourceIp": "203.0.113.5",
        "sendingAccountId": "123456789012",
        "messageId": "0100019391e2a8f2-6a3c7c45-1f1c-4c3a-9d60-7b1c0f6ad0a1-000000",
        "destination": ["jane@example.org", "kim@example.net"],
        "headersTruncated": False,
        "commonHeaders": {
            "from": ["News <news@example.com>"],
            "to": ["jane@example.org"],
            "subject": "December news",
        },
    }
    if message_id:
        value["commonHeaders"]["messageId"] = f"<{message_id}@example.com>"
    if headers:
        value["headers"] = [
            {"name": "From", "value": "News <news@example.com>"},
            {"name": "To", "value": "jane@example.org"},
            {"name": "Subject", "value": "December news"},
            {"name": "MIME-Version", "value": "1.0"},
        ] + ([{"name": "Message-ID", "value": f"<{message_id}@example.com>"}] if message_id else [])
    return value


def bounce(bounce_type: str = "Permanent", sub_type: str = "General", *, key: str = "notificationType", **mail_args):
    return {
        key: "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": sub_type,
            "bouncedRecipients": [
                {
                    "emailAddress": "Jane@Example.org",
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 <jane@example.org>: Recipient address rejected: User unknown",
                },
                {"emailAddress": "kim@example.net", "action": "failed", "status": "5.1.1"},
            ],
            "timestamp": "2026-12-04T11:58:03.000Z",
            "feedbackId": "0100019391e2b1c4-bounce-feedback-000000",
            "remoteMtaIp": "198.51.100.7",
            "reportingMTA": "dsn; a8-12.smtp-out.amazonses.com",
        },
        "mail": mail(**mail_args),
    }


def complaint(*, key: str = "notificationType", feedback_type: str | None = "abuse") -> dict:
    body = {
        "userAgent": "ExampleCorp Feedback Loop (V0.01)",
        "complainedRecipients": [{"emailAddress": "jane@example.org"}],
        "timestamp": "2026-12-04T12:30:00.000Z",
        "feedbackId": "0100019391f0-complaint-feedback-000000",
        "arrivalDate": "2026-12-04T12:29:58.000Z",
    }
    if feedback_type:
        body["complaintFeedbackType"] = feedback_type
    return {key: "Complaint", "complaint": body, "mail": mail()}


def delivery(*, key: str = "notificationType") -> dict:
    return {
        key: "Delivery",
        "delivery": {
            "timestamp": "2026-12-04T11:58:04.000Z",
            "processingTimeMillis": 1520,
            "recipients": ["jane@example.org"],
            "smtpResponse": "250 2.6.0 Message received",
            "remoteMtaIp": "198.51.100.7",
            "reportingMTA": "a8-12.smtp-out.amazonses.com",
        },
        "mail": mail(),
    }


@pytest.mark.parametrize("key", ["notificationType", "eventType"])
def test_a_permanent_bounce_is_a_hard_bounce_per_recipient(key):
    notification = ses.read(json.dumps(bounce(key=key)))
    assert notification.type == "Bounce"
    assert notification.ses_message_id == "0100019391e2a8f2-6a3c7c45-1f1c-4c3a-9d60-7b1c0f6ad0a1-000000"
    assert notification.findings == [
        Finding(
            kind=Kind.HARD_BOUNCE,
            source="ses",
            recipient="jane@example.org",
            message_id=MESSAGE_ID,
            status="5.1.1",
            diagnostic="smtp; 550 5.1.1 <jane@example.org>: Recipient address rejected: User unknown",
            feedback_type="General",
            reference="0100019391e2b1c4-bounce-feedback-000000",
        ),
        Finding(
            kind=Kind.HARD_BOUNCE,
            source="ses",
            recipient="kim@example.net",
            message_id=MESSAGE_ID,
            status="5.1.1",
            feedback_type="General",
            reference="0100019391e2b1c4-bounce-feedback-000000",
        ),
    ]


@pytest.mark.parametrize(
    ("bounce_type", "sub_type"), [("Transient", "MailboxFull"), ("Undetermined", "Undetermined"), ("Novel", "")]
)
def test_other_bounces_are_soft(bounce_type, sub_type):
    findings = ses.read(bounce(bounce_type, sub_type)).findings
    assert [f.kind for f in findings] == [Kind.SOFT_BOUNCE, Kind.SOFT_BOUNCE]


@pytest.mark.parametrize("sub_type", ["OnAccountSuppressionList", "Suppressed"])
def test_a_suppressed_address_is_a_hard_bounce_that_does_not_count_for_the_campaign(sub_type):
    findings = ses.read(bounce("Permanent", sub_type)).findings
    assert [(f.kind, f.feedback_type, f.counts_for_campaign) for f in findings] == [
        (Kind.HARD_BOUNCE, sub_type, False),
        (Kind.HARD_BOUNCE, sub_type, False),
    ]


@pytest.mark.parametrize(
    ("bounce_type", "sub_type"), [("Permanent", "General"), ("Permanent", "NoEmail"), ("Transient", "General")]
)
def test_a_bounce_caused_by_this_message_counts_for_the_campaign(bounce_type, sub_type):
    assert all(f.counts_for_campaign for f in ses.read(bounce(bounce_type, sub_type)).findings)


def test_a_complaint_from_the_suppression_list_does_not_count_for_the_campaign():
    notification = complaint(feedback_type=None)
    notification["complaint"]["complaintSubType"] = "OnAccountSuppressionList"
    (finding,) = ses.read(notification).findings
    assert (finding.kind, finding.feedback_type, finding.counts_for_campaign) == (
        Kind.COMPLAINT,
        "OnAccountSuppressionList",
        False,
    )
    (finding,) = ses.read(complaint()).findings
    assert finding.counts_for_campaign is True


@pytest.mark.parametrize("key", ["notificationType", "eventType"])
def test_a_complaint(key):
    notification = ses.read(json.dumps(complaint(key=key)))
    assert notification.type == "Complaint"
    assert notification.findings == [
        Finding(
            kind=Kind.COMPLAINT,
            source="ses",
            recipient="jane@example.org",
            message_id=MESSAGE_ID,
            feedback_type="abuse",
            reference="0100019391f0-complaint-feedback-000000",
        )
    ]


def test_a_complaint_without_a_feedback_type():
    (finding,) = ses.read(complaint(feedback_type=None)).findings
    assert finding.kind == Kind.COMPLAINT and finding.feedback_type is None


@pytest.mark.parametrize("key", ["notificationType", "eventType"])
def test_a_delivery_changes_nothing_but_is_a_finding(key):
    notification = ses.read(delivery(key=key))
    assert notification.findings == [
        Finding(
            kind=Kind.DELIVERED,
            source="ses",
            recipient="jane@example.org",
            message_id=MESSAGE_ID,
            diagnostic="250 2.6.0 Message received",
            reference="0100019391e2a8f2-6a3c7c45-1f1c-4c3a-9d60-7b1c0f6ad0a1-000000",
        )
    ]


def test_the_message_id_from_the_common_headers_alone():
    (first, _) = ses.read(bounce(headers=False)).findings
    assert first.message_id == MESSAGE_ID


def test_a_lower_case_message_id_is_read_upper_case():
    (first, _) = ses.read(bounce(message_id=MESSAGE_ID.lower())).findings
    assert first.message_id == MESSAGE_ID


@pytest.mark.parametrize(
    "value", ["<91JF3Z8M2T6QK4V7W9XBCDEFGH@example.com>", "<01JF3Z8M2T6QK4V7W9XBCDEFG@example.com>"]
)
def test_a_message_id_not_of_the_ulid_form_names_no_message(value):
    notification = bounce(message_id=None)
    notification["mail"]["commonHeaders"]["messageId"] = value
    (first, _) = ses.read(notification).findings
    assert first.message_id is None


def test_a_message_id_not_ours_names_no_message():
    notification = bounce(message_id=None)
    notification["mail"]["commonHeaders"]["messageId"] = "<CAF=abc123@mail.gmail.com>"
    (first, _) = ses.read(notification).findings
    assert first.message_id is None and first.recipient == "jane@example.org"


def test_a_verp_return_path_names_the_message(env):
    env.setenv("SMARTMAIL_BOUNCE_DOMAIN", "bounces.example.com")
    runtime.reset()
    address = bounce_address(MESSAGE_ID)
    assert address is not None
    (first, _) = ses.read(bounce(message_id=None, source=address)).findings
    assert first.message_id == MESSAGE_ID
    forged = address.replace(address.split(".")[1][:4], "aaaa")
    (first, _) = ses.read(bounce(message_id=None, source=forged)).findings
    assert first.message_id is None


def test_a_verp_return_path_header_names_the_message(env):
    env.setenv("SMARTMAIL_BOUNCE_DOMAIN", "bounces.example.com")
    runtime.reset()
    notification = bounce(message_id=None)
    notification["mail"]["headers"].append({"name": "Return-Path", "value": f"<{bounce_address(MESSAGE_ID)}>"})
    (first, _) = ses.read(notification).findings
    assert first.message_id == MESSAGE_ID


def test_a_long_diagnostic_is_capped():
    notification = bounce()
    notification["bounce"]["bouncedRecipients"][0]["diagnosticCode"] = "x" * 5000
    (first, _) = ses.read(notification).findings
    assert first.diagnostic == "x" * dsn.DIAGNOSTIC_MAX


def test_recipients_without_an_address_are_skipped():
    notification = bounce()
    notification["bounce"]["bouncedRecipients"] = [{"status": "5.1.1"}, "jane@example.org", {"emailAddress": ""}]
    assert ses.read(notification).findings == []


@pytest.mark.parametrize(
    "message",
    [
        "Successfully validated SNS topic for Amazon SES event publishing.",
        "[1, 2]",
        json.dumps({"eventType": "Open", "open": {"timestamp": "2026-12-04T12:00:00.000Z"}, "mail": mail()}),
        json.dumps({"eventType": "Send", "send": {}, "mail": mail()}),
        json.dumps({"notificationType": "AmazonSnsSubscriptionSucceeded", "message": "You have successfully..."}),
        json.dumps({"notificationType": "Bounce"}),
        json.dumps({"notificationType": "Bounce", "bounce": "garbled", "mail": []}),
    ],
)
def test_anything_else_has_no_findings(message):
    assert ses.read(message).findings == []


def test_unknown_types_say_what_they_were():
    assert ses.read(json.dumps({"eventType": "DeliveryDelay", "mail": mail()})).type == "DeliveryDelay"
    assert ses.read("not json").type == ""
