"""The naive webhook baseline of the benchmarks: one Celery task per event, one `requests.post` each.

What people write first: Celery's defaults throughout (early acks, prefetch 4, no result backend),
a new HTTP connection per call (`requests.post` opens its own session), signed with the
`standardwebhooks` package so the work per event matches SmartMail's. The broker comes from
NAIVE_BROKER_URL (default redis://127.0.0.1:6379/0), its keys' prefix from NAIVE_KEY_PREFIX.

Run a worker with `celery -A naive_webhooks worker` from this directory (or with it on PYTHONPATH).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

import requests
from celery import Celery
from standardwebhooks import Webhook

app = Celery("naive_webhooks", broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.broker_connection_retry_on_startup = True  # only silences a start-up warning
app.conf.broker_transport_options = {"global_keyprefix": os.environ.get("NAIVE_KEY_PREFIX", "")}


@app.task
def deliver(url: str, body: str, secret: str) -> None:
    webhook_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(tz=UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, now, body),
    }
    response = requests.post(url, data=body.encode(), headers=headers, timeout=15)
    response.raise_for_status()
