"""Webhook endpoints: add, change, enable and disable, rotate secrets; their secrets encrypted at rest."""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import delete, select, update

from smartmail import runtime
from smartmail.audience import event_stream
from smartmail.config import get_settings
from smartmail.content.signing import derived_key
from smartmail.errors import Conflict, InvalidInput, NotFound
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import WebhookEndpoint
from smartmail.webhooks import fan_out, network_guard
from smartmail.webhooks.signatures import new_secret

log = structlog.get_logger("smartmail.webhooks")

MAX_DESCRIPTION = 500
MAX_IN_FLIGHT = 100
DEFAULT_IN_FLIGHT = 10  # concurrent requests to one endpoint, unless it says otherwise
MAX_BATCH = 1000
MAX_FILTER_ITEMS = 100
DEFAULT_ROTATION_OVERLAP = 24 * 3600.0  # seconds the previous secret keeps signing after a rotation


# An endpoint's health columns once it answers (or an operator enables it): no failure streak, circuit closed.
HEALTHY: dict[str, Any] = {
    "failing_since": None,
    "consecutive_failures": 0,
    "circuit_open_until": None,
    "circuit_pause": None,
}


class SecretUnreadable(Conflict):
    """An endpoint secret that the current SMARTMAIL_SECRET_KEY cannot decrypt (the key was changed):
    a 409 over HTTP until the secret is rotated."""


@runtime.per_process()
def _cipher(secret_key: str) -> Fernet:
    # Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) with a key derived for this purpose only.
    return Fernet(base64.urlsafe_b64encode(derived_key(secret_key, "webhook-secret")))


def encrypt(secret: str) -> str:
    return _cipher(get_settings().secret_key).encrypt(secret.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _cipher(get_settings().secret_key).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "the endpoint's secret was encrypted with another SMARTMAIL_SECRET_KEY (rotate it)"
        ) from None


def allowed_networks() -> list:
    return network_guard.parse_networks(get_settings().webhook_allow_networks, field="SMARTMAIL_WEBHOOK_ALLOW_NETWORKS")


def check_url(url: Any) -> str:
    if not isinstance(url, str):
        raise InvalidInput("must be an https:// URL", field="url")
    settings = get_settings()
    return network_guard.check_url(url, allow_http=settings.webhook_allow_http, allowed=allowed_networks())


def _check_description(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise InvalidInput(f"must be text of at most {MAX_DESCRIPTION} characters", field="description")
    return value or None


def _check_int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"must be a whole number from {low} to {high}", field=field)
    return value


def _check_rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidInput("must be a number of requests per second above 0, or null for no limit", field="rate_limit")
    return float(value)


def _check_campaign_ids(values: Any) -> list[int] | None:
    if values is None or values == []:
        return None
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) > MAX_FILTER_ITEMS:
        raise InvalidInput(f"must be a list of at most {MAX_FILTER_ITEMS} campaign ids", field="campaign_ids")
    return sorted({_check_int(value, f"campaign_ids[{i}]", 1, 2**31 - 1) for i, value in enumerate(values)})


def _check_tags(values: Any) -> list[str] | None:
    if values is None or values == []:
        return None
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) > MAX_FILTER_ITEMS:
        raise InvalidInput(f"must be a list of at most {MAX_FILTER_ITEMS} tags", field="tags")
    for i, value in enumerate(values):
        if not isinstance(value, str) or not 0 < len(value) <= 100:
            raise InvalidInput("a tag is 1-100 characters", field=f"tags[{i}]")
    return sorted(set(values))


def _check_event_types(values: Any) -> list[str] | None:
    if values is not None and (not isinstance(values, Sequence) or isinstance(values, str)):
        raise InvalidInput("must be a list of event types, or null for every type", field="event_types")
    return event_stream.check_types(values, field="event_types")


# Each field a caller may set, with its check (None: the column's default).
_CHECKS = {
    "url": check_url,
    "description": _check_description,
    "event_types": _check_event_types,
    "campaign_ids": _check_campaign_ids,
    "tags": _check_tags,
    "rate_limit": _check_rate,
    "max_in_flight": lambda value: _check_int(value, "max_in_flight", 1, MAX_IN_FLIGHT),
    "batch_size": lambda value: _check_int(value, "batch_size", 1, MAX_BATCH),
}


def as_dict(row: WebhookEndpoint) -> dict[str, Any]:
    """An endpoint as the API and CLI show it: never its secret."""
    return {
        "id": row.id,
        "url": row.url,
        "description": row.description,
        "event_types": row.event_types,
        "campaign_ids": row.campaign_ids,
        "tags": row.tags,
        "enabled": row.enabled,
        "disabled_reason": row.disabled_reason,
        "rate_limit": row.rate_limit,
        "max_in_flight": row.max_in_flight,
        "batch_size": row.batch_size,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "last_success_at": row.last_success_at,
        "failing_since": row.failing_since,
        "circuit_open_until": row.circuit_open_until,
        "previous_secret_until": row.previous_secret_until,
    }


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(_CHECKS))
    if unknown:
        raise InvalidInput(f"unknown field; known: {', '.join(_CHECKS)}", field=unknown[0])
    return {name: _CHECKS[name](value) for name, value in fields.items()}


def create_endpoint(url: str, **fields: Any) -> tuple[dict[str, Any], str]:
    """Add an endpoint; it receives the events written from now on. Returns it and its new secret
    (`whsec_…`), which `reveal_secret` shows again."""
    values = _checked({"url": url, **fields})
    secret = new_secret()
    with session_scope() as session:
        # Under the fan-out's lock: every event after `start_position` is matched against the endpoint.
        connection = session.connection()
        fan_out.lock_checkpoint(connection)
        row = WebhookEndpoint(
            **{"max_in_flight": DEFAULT_IN_FLIGHT, "batch_size": 1, **values},
            secret=encrypt(secret),
            enabled=True,
            consecutive_failures=0,
            start_position=str(event_stream.end(connection)),
        )
        session.add(row)
        session.flush()
        endpoint = as_dict(row)
    log.info("webhooks.endpoint_created", endpoint_id=endpoint["id"])
    return endpoint, secret


def _get(session, endpoint_id: int) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None:
        raise NotFound(f"No webhook endpoint {endpoint_id}.")
    return row


def get_endpoint(endpoint_id: int) -> dict[str, Any]:
    with session_scope() as session:
        return as_dict(_get(session, endpoint_id))


def list_endpoints(*, limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
    """Endpoints by id, after `after` (keyset paging)."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.id).limit(limit)
    if after is not None:
        query = query.where(WebhookEndpoint.id > after)
    with session_scope() as session:
        return [as_dict(row) for row in session.scalars(query)]


def update_endpoint(endpoint_id: int, **fields: Any) -> dict[str, Any]:
    """Change the fields given (the URL, filters, limits); the others stay as they are."""
    values = _checked(fields)
    with session_scope() as session:
        row = _get(session, endpoint_id)
        for name, value in values.items():
            setattr(row, name, value)
        row.updated_at = utcnow()
        session.flush()
        return as_dict(row)


def delete_endpoint(endpoint_id: int) -> None:
    """Remove an endpoint with its deliveries (attempts are deleted by retention)."""
    with session_scope() as session:
        deleted = session.connection().execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))
        if deleted.rowcount == 0:
            raise NotFound(f"No webhook endpoint {endpoint_id}.")


def set_enabled(endpoint_id: int, enabled: bool, *, reason: str | None = None) -> dict[str, Any]:
    """Enable (its circuit closed, its failure streak forgotten: the backlog goes out at once) or
    disable (nothing is sent; new events are not queued for it)."""
    changes: dict[str, Any] = {"enabled": enabled, "updated_at": utcnow()}
    if enabled:
        changes.update(disabled_reason=None, **HEALTHY)
    else:
        changes["disabled_reason"] = reason or "disabled by an operator"
    with session_scope() as session:
        _get(session, endpoint_id)
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(**changes))
    log.info("webhooks.endpoint_enabled" if enabled else "webhooks.endpoint_disabled", endpoint_id=endpoint_id)
    return get_endpoint(endpoint_id)


def rotate_secret(endpoint_id: int, *, overlap_seconds: float = DEFAULT_ROTATION_OVERLAP) -> tuple[dict, str]:
    """A new secret for the endpoint; the current one keeps signing (both signatures are sent) for
    `overlap_seconds`, so the receiver can switch without rejecting a delivery. Returns the new secret."""
    if isinstance(overlap_seconds, bool) or not 0 <= overlap_seconds <= 30 * 86400:
        raise InvalidInput("must be 0 to 30 days, in seconds", field="overlap_seconds")
    secret = new_secret()
    with session_scope() as session:
        row = _get(session, endpoint_id)
        row.previous_secret = row.secret if overlap_seconds else None
        row.previous_secret_until = utcnow() + timedelta(seconds=overlap_seconds) if overlap_seconds else None
        row.secret = encrypt(secret)
        row.updated_at = utcnow()
        session.flush()
        endpoint = as_dict(row)
    log.info("webhooks.secret_rotated", endpoint_id=endpoint_id)
    return endpoint, secret


def reveal_secret(endpoint_id: int) -> str:
    with session_scope() as session:
        return decrypt(_get(session, endpoint_id).secret)


@dataclass(frozen=True)
class Target:
    """What the sender needs of an endpoint, read at the start of each round."""

    id: int
    url: str
    enabled: bool
    secrets: tuple[str, ...] = field(repr=False)  # the current one first; the previous one while its rotation lasts
    rate_limit: float | None
    max_in_flight: int
    batch_size: int
    circuit_open_until: datetime | None
    paced_until: datetime | None


def target(endpoint_id: int) -> Target | None:
    """The endpoint as the sender uses it (secrets decrypted); None if it was deleted."""
    with session_scope() as session:
        row = session.get(WebhookEndpoint, endpoint_id)
        if row is None:
            return None
        secrets = [decrypt(row.secret)]
        if row.previous_secret and row.previous_secret_until and row.previous_secret_until > utcnow():
            with contextlib.suppress(SecretUnreadable):  # rotated because it was unreadable
                secrets.append(decrypt(row.previous_secret))
        return Target(
            id=row.id,
            url=row.url,
            enabled=row.enabled,
            secrets=tuple(secrets),
            rate_limit=row.rate_limit,
            max_in_flight=row.max_in_flight,
            batch_size=row.batch_size,
            circuit_open_until=row.circuit_open_until,
            paced_until=row.paced_until,
        )
