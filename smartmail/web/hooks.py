"""Provider webhooks outside /v1: POST /hooks/ses for Amazon SES notifications through SNS (signed, no API key)."""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from smartmail.campaigns.feedback_guard import pause_if_unhealthy
from smartmail.config import get_settings
from smartmail.feedback import effects, ses, sns
from smartmail.web.problems import problem

log = structlog.get_logger("smartmail.hooks")

router = APIRouter(prefix="/hooks", include_in_schema=False)

# SNS caps a message at 256 KB; its envelope adds little on top.
MAX_BODY_BYTES = 256 * 1024 + 8 * 1024
# SNS posts `text/plain; charset=UTF-8` (AWS SNS developer guide, "HTTP/S notification JSON format").
MEDIA_TYPES = frozenset({"text/plain", "application/json"})


async def _body(request: Request) -> bytes | None:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    return bytes(body)


def _handle(message: dict[str, Any]) -> dict[str, Any]:
    """Verify and act on one SNS message; the outcome, for the response and the log. Sync: it
    may fetch a certificate and writes to the database."""
    sns.verify(message)
    kind = message["Type"]
    if kind == "SubscriptionConfirmation":
        sns.confirm_subscription(message)
        log.info("ses.subscription_confirmed", topic=message["TopicArn"])
        return {"status": "confirmed"}
    if kind == "UnsubscribeConfirmation":
        # Not re-subscribed: an operator who wants the topic back confirms it in the SNS console.
        log.warning("ses.unsubscribed", topic=message["TopicArn"])
        return {"status": "unsubscribed"}
    notification = ses.read(message["Message"])
    if not notification.findings:
        log.info("ses.ignored", type=notification.type or "not an SES notification", sns_id=message["MessageId"])
        return {"status": "ignored", "type": notification.type}
    # Keyed by message and kind (or by SES's feedbackId): SNS redelivers, and a replay changes nothing.
    applied = effects.apply(notification.findings, origin=f"sns:{message['MessageId']}")
    paused = pause_if_unhealthy(applied.campaign_ids)
    counts = dict(applied.counts)
    log.info("ses.applied", type=notification.type, sns_id=message["MessageId"], **counts)
    return {"status": "applied", "type": notification.type, "counts": counts, "paused_campaigns": paused}


@router.post("/ses")
async def ses_hook(request: Request) -> Response:
    """An SNS message for one of SMARTMAIL_SES_TOPIC_ARNS: a subscription confirmation (confirmed)
    or an SES bounce, complaint or delivery notification (applied: a redelivery changes nothing).
    403 when the signature, certificate, topic or time is wrong; 404 while no topic is configured."""
    if not get_settings().ses_topic_arns:
        return problem(404, "There is nothing at this URL.")
    media_type = request.headers.get("content-type", "text/plain").split(";", 1)[0].strip().lower()
    if media_type not in MEDIA_TYPES:
        return problem(415, "The body must be an SNS message (text/plain or application/json).")
    body = await _body(request)
    if body is None:
        return problem(413, f"The body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        message = json.loads(body)
    except ValueError:
        return problem(400, "The body is not JSON: an SNS message is a JSON object.")
    if not isinstance(message, dict):
        return problem(400, "The body is not a JSON object: an SNS message is one.")
    declared = request.headers.get("x-amz-sns-message-type")
    if declared is not None and declared != message.get("Type"):
        return problem(403, "Refused: x-amz-sns-message-type does not match the message's Type.")
    try:
        outcome = await run_in_threadpool(_handle, message)
    except sns.Refused as exc:
        log.warning("ses.refused", reason=exc.reason)
        return problem(403, f"Refused: {exc.reason}.", reason=exc.reason)
    except sns.Unavailable as exc:
        log.warning("ses.unavailable", reason=str(exc))
        return problem(503, f"Try again later: {exc}.", headers={"Retry-After": "60"})
    return JSONResponse(outcome)
