"""Standard Webhooks signing: what SmartMail sends verifies with the spec's own package and with `verify`."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook

from smartmail.webhooks import WebhookVerificationError, verify
from smartmail.webhooks.signatures import headers_for, new_secret

BODY = b'{"type":"sent","timestamp":"2026-12-04T12:00:00Z","data":{"id":1}}'


def test_a_new_secret_is_whsec_and_32_random_bytes():
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32


def test_headers_verify_with_the_standardwebhooks_package_and_with_verify():
    secret = new_secret()
    headers = headers_for("msg_1", BODY, [secret])
    assert headers["webhook-id"] == "msg_1"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers) == verify(BODY, headers, secret)
    assert verify(BODY.decode(), headers, secret)["data"] == {"id": 1}


def test_during_a_rotation_both_secrets_sign_and_either_verifies():
    old, new = new_secret(), new_secret()
    headers = headers_for("msg_2", BODY, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify(BODY, headers, old) and verify(BODY, headers, new)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, new_secret())


@pytest.mark.parametrize(
    "change",
    [
        lambda body, headers: (body + b" ", headers),  # the body altered
        lambda body, headers: (body, {**headers, "webhook-id": "msg_other"}),  # the id swapped
        lambda body, headers: (body, {k: v for k, v in headers.items() if k != "webhook-signature"}),
        lambda body, headers: (body, {**headers, "webhook-timestamp": str(int(time.time()) - 301)}),  # stale
        lambda body, headers: (body, {**headers, "webhook-timestamp": str(int(time.time()) + 301)}),  # future
    ],
)
def test_verify_refuses_altered_stale_or_incomplete_deliveries(change):
    secret = new_secret()
    body, headers = change(BODY, headers_for("msg_3", BODY, [secret]))
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, secret)


def test_a_delivery_signed_six_minutes_ago_is_stale():
    secret = new_secret()
    headers = headers_for("msg_4", BODY, [secret], at=time.time() - 360)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(BODY, headers, secret)
