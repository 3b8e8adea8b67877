"""Standard Webhooks signatures: the headers SmartMail sends, and `verify` for receivers (standardwebhooks)."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookVerificationError", "headers_for", "new_secret", "verify"]

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh endpoint secret: `whsec_` and 32 random bytes in base64, as the spec's examples."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def headers_for(webhook_id: str, body: bytes, secrets: Iterable[str], *, at: float | None = None) -> dict[str, str]:
    """The request headers of one delivery attempt: its id, the attempt's time, and a `v1,` signature
    per secret (two while a rotation lets the previous secret sign), space-separated as the spec says
    (github.com/standard-webhooks/standard-webhooks, spec/standard-webhooks.md, "Signature scheme")."""
    timestamp = int(time.time() if at is None else at)
    signed_at = datetime.fromtimestamp(timestamp, UTC)
    signatures = " ".join(Webhook(secret).sign(webhook_id, signed_at, body) for secret in secrets)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


def verify(payload: bytes | str, headers: Mapping[str, str], secret: str) -> Any:
    """For receivers: the parsed JSON body when `headers` carry a valid signature of `payload` (the raw
    body, exactly as received) by `secret` and a timestamp within 5 minutes of now; otherwise raises
    WebhookVerificationError. Dedupe on the `webhook-id` header: a retry repeats it."""
    return Webhook(secret).verify(payload, dict(headers))
