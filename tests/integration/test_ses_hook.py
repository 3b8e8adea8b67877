"""POST /hooks/ses on a real `smartmail web`: SNS-signed SES notifications (a throwaway key, its certificate
served from a local HTTP server the test-only prefix allows) applied once; forged or stale ones refused."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from smartmail.store.engine import session_scope
from smartmail.store.ids import new_id
from smartmail.store.models import Campaign, Contact, Event, FeedbackMark, Message, Suppression
from tests.conftest import reset_caches
from tests.integration.conftest import sent_message

TOPIC = "arn:aws:sns:us-east-1:123456789012:smartmail-ses"
SNS_HEADERS = {"Content-Type": "text/plain; charset=UTF-8"}


class FakeSnsHost:
    """A local stand-in for SNS's certificate and subscription URLs; records every path requested."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.requests: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.requests.append(self.path)
                body = host.pem if self.path == "/cert.pem" else b"<ConfirmSubscriptionResponse/>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def sign(self, message: dict, version: str = "1") -> dict:
        """As SNS signs (AWS guide "Verifying the signatures of Amazon SNS messages"), written out here."""
        if message["Type"] == "Notification":
            names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
        else:
            names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
        text = "".join(f"{name}\n{message[name]}\n" for name in names if name in message)
        signature = self.key.sign(
            text.encode(), padding.PKCS1v15(), hashes.SHA1() if version == "1" else hashes.SHA256()
        )
        return {**message, "SignatureVersion": version, "Signature": base64.b64encode(signature).decode()}

    def notification(self, ses: dict, *, version: str = "1", **fields) -> dict:
        message = {
            "Type": "Notification",
            "MessageId": str(new_id()),
            "TopicArn": TOPIC,
            "Message": json.dumps(ses),
            "Timestamp": timestamp(),
            "SigningCertURL": f"{self.prefix}cert.pem",
            "UnsubscribeURL": f"{self.prefix}unsubscribe",
        }
        message.update(fields)
        return self.sign(message, version)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def timestamp(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture(scope="module")
def sns_host():
    host = FakeSnsHost()
    yield host
    host.stop()


@pytest.fixture
def hook(env, monkeypatch, _module_web, sns_host):
    """An httpx client on a real `smartmail web` that accepts TOPIC and the local certificate server.
    The settings are the same for every test of the module (per database): the process is reused."""
    monkeypatch.setenv("SMARTMAIL_SES_TOPIC_ARNS", json.dumps([TOPIC]))
    monkeypatch.setenv("SMARTMAIL_SNS_TEST_CERTIFICATE_PREFIX", sns_host.prefix)
    # Low enough for a three-message campaign to trip the complaint-rate pause.
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_MIN_DELIVERED", "3")
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_COMPLAINT_RATE", "0.3")
    reset_caches()
    sns_host.requests.clear()
    with httpx.Client(base_url=_module_web.start(), timeout=30) as client:
        yield client


def ses_bounce(message_id: str, email: str = "gone@example.org", bounce_type: str = "Permanent") -> dict:
    """An SES bounce notification as the SES developer guide shows one."""
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": email,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": f"smtp; 550 5.1.1 <{email}>: Recipient address rejected: User unknown",
                }
            ],
            "timestamp": timestamp(),
            "feedbackId": f"0100019391e2b1c4-{message_id.lower()}-000000",
            "reportingMTA": "dsn; a8-12.smtp-out.amazonses.com",
        },
        "mail": {
            "timestamp": timestamp(),
            "source": "news@example.com",
            "messageId": "0100019391e2a8f2-6a3c7c45-1f1c-4c3a-9d60-7b1c0f6ad0a1-000000",
            "destination": [email],
            "headersTruncated": False,
            "headers": [
                {"name": "From", "value": "News <news@example.com>"},
                {"name": "To", "value": email},
                {"name": "Message-ID", "value": f"<{message_id}@example.com>"},
            ],
            "commonHeaders": {
                "from": ["News <news@example.com>"],
                "to": [email],
                "messageId": f"<{message_id}@example.com>",
            },
        },
    }


def ses_complaint(message_id: str, email: str = "gone@example.org") -> dict:
    notification = ses_bounce(message_id, email)
    del notification["bounce"]
    notification["notificationType"] = "Complaint"
    notification["complaint"] = {
        "complainedRecipients": [{"emailAddress": email}],
        "timestamp": timestamp(),
        "feedbackId": "0100019391f0-complaint-feedback-000000",
        "complaintFeedbackType": "abuse",
    }
    return notification


def post(client: httpx.Client, message: dict) -> httpx.Response:
    return client.post(
        "/hooks/ses",
        content=json.dumps(message),
        headers={**SNS_HEADERS, "x-amz-sns-message-type": str(message.get("Type"))},
    )


def state() -> dict:
    """Everything a notification may change."""
    with session_scope() as session:
        return {
            "messages": dict(session.execute(select(Message.id, Message.state)).all()),
            "contacts": dict(session.execute(select(Contact.email, Contact.status)).all()),
            "suppressions": {s.email: (s.reason, s.source_message_id) for s in session.scalars(select(Suppression))},
            "events": session.scalar(select(func.count()).select_from(Event)),
            "marks": session.scalar(select(func.count()).select_from(FeedbackMark)),
        }


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_signed_hard_bounce_is_applied_once(hook, sns_host, version):
    message_id = sent_message("gone@example.org")
    notification = sns_host.notification(ses_bounce(message_id), version=version)

    response = post(hook, notification)
    assert response.status_code == 200, response.text
    assert response.json()["counts"] == {"hard_bounce": 1}
    after = state()
    assert after["messages"][message_id] == "bounced"
    assert after["suppressions"]["gone@example.org"] == ("hard_bounce", message_id)
    assert after["contacts"]["gone@example.org"] == "bounced"
    assert sns_host.requests in ([], ["/cert.pem"])  # fetched once per web process, then cached
    with session_scope() as session:
        (event,) = session.scalars(select(Event).where(Event.message_id == message_id))
        assert (event.type, event.properties["source"], event.properties["status"]) == ("bounced", "ses", "5.1.1")

    # SNS redelivers (the same message), or SES reports the same bounce again (a new SNS message).
    again = post(hook, notification)
    assert again.status_code == 200 and again.json()["counts"] == {"duplicate": 1}
    assert post(hook, sns_host.notification(ses_bounce(message_id))).json()["counts"] == {"duplicate": 1}
    assert state() == after


def test_a_signed_complaint_is_applied(hook, sns_host):
    message_id = sent_message("angry@example.org")
    response = post(hook, sns_host.notification(ses_complaint(message_id, "angry@example.org"), Subject="SES"))
    assert response.status_code == 200, response.text
    after = state()
    assert after["messages"][message_id] == "sent"
    assert after["suppressions"]["angry@example.org"] == ("complaint", message_id)
    assert after["contacts"]["angry@example.org"] == "complained"


def test_complaints_through_ses_pause_their_campaign(hook, sns_host):
    with session_scope() as session:
        campaign = Campaign(name="december", state="sending", template_name="news", sender="news@example.com", lists=[])
        session.add(campaign)
        session.flush()
        campaign_id = campaign.id
    message_ids = [sent_message(f"reader{n}@example.org", campaign_id=campaign_id) for n in range(3)]
    response = post(hook, sns_host.notification(ses_complaint(message_ids[0], "reader0@example.org")))
    assert response.status_code == 200 and response.json()["paused_campaigns"] == ["december"]
    with session_scope() as session:
        campaign = session.get(Campaign, campaign_id)
        assert (campaign.state, campaign.complaints) == ("paused", 1)
        assert campaign.paused_reason.startswith("complaint rate 33.33% (1 of 3 delivered)")


def test_a_delivery_or_an_unknown_notification_changes_nothing(hook, sns_host):
    message_id = sent_message("gone@example.org")
    delivery = ses_bounce(message_id)
    del delivery["bounce"]
    delivery.update(
        notificationType="Delivery",
        delivery={"timestamp": timestamp(), "recipients": ["gone@example.org"], "smtpResponse": "250 2.6.0 Ok"},
    )
    before = state()
    response = post(hook, sns_host.notification(delivery))
    assert response.status_code == 200 and response.json()["counts"] == {"delivered": 1}
    open_event = sns_host.notification({"eventType": "Open", "open": {}, "mail": delivery["mail"]})
    test_message = sns_host.sign(
        {**sns_host.notification({}), "Message": "Successfully validated SNS topic for Amazon SES event publishing."}
    )
    for message in (open_event, test_message):
        response = post(hook, message)
        assert response.status_code == 200 and response.json()["status"] == "ignored"
    after = state()
    assert after["messages"] == before["messages"] and after["suppressions"] == {} and after["events"] == 0


def _tampered(host: FakeSnsHost, notification: dict) -> dict:
    return {**notification, "Message": notification["Message"].replace("gone@", "other@")}


def _unsigned(host: FakeSnsHost, notification: dict) -> dict:
    return {k: v for k, v in notification.items() if k != "Signature"}


def _version_3(host: FakeSnsHost, notification: dict) -> dict:
    return {**notification, "SignatureVersion": "3"}


def _wrong_host(host: FakeSnsHost, notification: dict) -> dict:
    return host.sign({**notification, "SigningCertURL": "https://sns.us-east-1.amazonaws.com.evil.com/cert.pem"})


def _plain_http(host: FakeSnsHost, notification: dict) -> dict:
    return host.sign({**notification, "SigningCertURL": "http://sns.us-east-1.amazonaws.com/cert.pem"})


def _stale(host: FakeSnsHost, notification: dict) -> dict:
    return host.sign({**notification, "Timestamp": timestamp(-timedelta(hours=2))})


def _other_topic(host: FakeSnsHost, notification: dict) -> dict:
    return host.sign({**notification, "TopicArn": "arn:aws:sns:us-east-1:999999999999:not-ours"})


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (_tampered, "the signature does not match"),
        (_unsigned, "Signature is missing"),
        (_version_3, "SignatureVersion is not 1 or 2"),
        (_wrong_host, "SigningCertURL is not on an Amazon SNS host"),
        (_plain_http, "SigningCertURL is not https"),
        (_stale, "Timestamp is too old (a replay?)"),
        (_other_topic, "TopicArn is not one of SMARTMAIL_SES_TOPIC_ARNS"),
    ],
)
def test_forged_or_stale_notifications_are_refused_and_change_nothing(hook, sns_host, forge, reason):
    message_id = sent_message("gone@example.org")
    before = state()
    response = post(hook, forge(sns_host, sns_host.notification(ses_bounce(message_id))))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["reason"] == reason
    assert "gone@" not in response.text
    assert state() == before
    assert "/cert.pem" not in sns_host.requests or forge is _tampered


def test_a_subscription_is_confirmed_at_its_url(hook, sns_host):
    confirmation = sns_host.sign(
        {
            "Type": "SubscriptionConfirmation",
            "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
            "Token": "2336412f37fb687f5d51e6e2425f004aed",
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}. To confirm, visit the SubscribeURL.",
            "SubscribeURL": f"{sns_host.prefix}confirm?Action=ConfirmSubscription&Token=2336412f37fb",
            "Timestamp": timestamp(),
            "SigningCertURL": f"{sns_host.prefix}cert.pem",
        },
        "2",
    )
    response = post(hook, confirmation)
    assert response.status_code == 200 and response.json() == {"status": "confirmed"}
    assert "/confirm?Action=ConfirmSubscription&Token=2336412f37fb" in sns_host.requests

    # A SubscribeURL elsewhere is never visited, however well signed.
    sns_host.requests.clear()
    elsewhere = sns_host.sign({**confirmation, "SubscribeURL": "http://169.254.169.254/latest/meta-data/"}, "2")
    response = post(hook, elsewhere)
    assert response.status_code == 403 and response.json()["reason"] == "SubscribeURL is not https"
    assert not any(path.startswith("/confirm") for path in sns_host.requests)


def test_an_unsubscribe_confirmation_is_acknowledged(hook, sns_host):
    message = sns_host.sign(
        {
            "Type": "UnsubscribeConfirmation",
            "MessageId": "47138184-6831-46b8-8f7c-afc488602d7d",
            "Token": "2336412f37fb687f5d51e6e2425f004aed",
            "TopicArn": TOPIC,
            "Message": "You have chosen to deactivate subscription.",
            "SubscribeURL": f"{sns_host.prefix}confirm?Action=ConfirmSubscription&Token=2336412f37fb",
            "Timestamp": timestamp(),
            "SigningCertURL": f"{sns_host.prefix}cert.pem",
        }
    )
    response = post(hook, message)
    assert response.status_code == 200 and response.json() == {"status": "unsubscribed"}
    assert not any(path.startswith("/confirm") for path in sns_host.requests)


def test_bodies_that_are_no_sns_message(hook, sns_host):
    response = hook.post("/hooks/ses", content=b"<xml/>", headers={"Content-Type": "application/xml"})
    assert response.status_code == 415
    response = hook.post("/hooks/ses", content=b"not json", headers=SNS_HEADERS)
    assert response.status_code == 400 and response.headers["content-type"] == "application/problem+json"
    response = hook.post("/hooks/ses", content=b"x" * (300 * 1024), headers=SNS_HEADERS)
    assert response.status_code == 413
    message = sns_host.notification(ses_bounce(new_id()))
    response = hook.post(
        "/hooks/ses", content=json.dumps(message), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200, response.text  # application/json is taken too
    response = hook.post(
        "/hooks/ses",
        content=json.dumps(message),
        headers={**SNS_HEADERS, "x-amz-sns-message-type": "SubscriptionConfirmation"},
    )
    assert response.status_code == 403


def test_the_hook_is_off_without_topics(env):
    # In process: a second `smartmail web` for one 404 is not worth its start-up.
    from smartmail.web.app import app

    reset_caches()
    with TestClient(app) as client:
        response = client.post("/hooks/ses", content=b"{}", headers=SNS_HEADERS)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
