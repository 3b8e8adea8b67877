"""/v1/webhooks: endpoints (add, change, enable, disable, remove), their secrets, test sends, deliveries and replays."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.errors import InvalidInput
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page
from smartmail.webhooks import deliveries, endpoints
from smartmail.webhooks.network_guard import MAX_URL_LENGTH

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

Manager = Annotated[Principal, Security(authorize, scopes=["webhooks:manage"])]
EndpointId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The endpoint's id.")]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The delivery's id.")]
DeliveryState = Literal["pending", "succeeded", "failed"]

_URL = (
    "Where events are POSTed: https (http only with SMARTMAIL_WEBHOOK_ALLOW_HTTP); a host that is, or "
    "resolves to, a private, loopback or link-local address is refused unless SMARTMAIL_WEBHOOK_ALLOW_NETWORKS "
    "names its network."
)
_EVENT_TYPES = "Only events of these types (`sent`, `bounced`, `opened`, a custom event's name, …); null: every type."
_CAMPAIGN_IDS = "Only events of these campaigns' messages; null: any campaign, or none."
_TAGS = "Only events of messages carrying one of these tags; null: any message."
_RATE_LIMIT = "Requests per second at most; null: as fast as the endpoint answers."
_MAX_IN_FLIGHT = "Requests sent to the endpoint at once at most (default 10)."
_BATCH_SIZE = (
    'Events per request (default 1). Above 1, a request\'s body is `{"type": "batch", "timestamp", "data": [...]}` '
    "under one webhook-id."
)


class _EndpointFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=endpoints.MAX_DESCRIPTION, description="A note for people.")
    event_types: list[str] | None = Field(None, max_length=endpoints.MAX_FILTER_ITEMS, description=_EVENT_TYPES)
    campaign_ids: list[int] | None = Field(None, max_length=endpoints.MAX_FILTER_ITEMS, description=_CAMPAIGN_IDS)
    tags: list[str] | None = Field(None, max_length=endpoints.MAX_FILTER_ITEMS, description=_TAGS)
    rate_limit: float | None = Field(None, gt=0, allow_inf_nan=False, description=_RATE_LIMIT)
    # Not nullable: a null is refused (422) rather than read as "the default".
    max_in_flight: int = Field(None, ge=1, le=endpoints.MAX_IN_FLIGHT, description=_MAX_IN_FLIGHT)  # type: ignore[assignment]
    batch_size: int = Field(None, ge=1, le=endpoints.MAX_BATCH, description=_BATCH_SIZE)  # type: ignore[assignment]

    def fields(self) -> dict[str, Any]:
        """The keys the client sent, as the domain names them."""
        return self.model_dump(exclude_unset=True)


class EndpointIn(_EndpointFields):
    url: str = Field(max_length=MAX_URL_LENGTH, description=_URL)


class EndpointChange(_EndpointFields):
    url: str = Field(None, max_length=MAX_URL_LENGTH, description=_URL)  # type: ignore[assignment]
    enabled: bool = Field(  # type: ignore[assignment]
        None,
        description="false: nothing is sent and new events are not queued for it; true: its circuit closed and "
        "its failure streak forgotten, so the backlog goes out at once.",
    )
    disabled_reason: str | None = Field(
        None, max_length=endpoints.MAX_DESCRIPTION, description="Why, kept with `enabled: false`."
    )


class DeliveryCounts(BaseModel):
    pending: int = Field(description="Waiting for their first or next attempt.")
    succeeded: int = Field(description="Answered with a 2xx.")
    failed: int = Field(description="Every attempt of the retry schedule failed (replay sends them again).")


class EndpointOut(BaseModel):
    id: int
    url: str
    description: str | None
    event_types: list[str] | None = Field(description=_EVENT_TYPES)
    campaign_ids: list[int] | None = Field(description=_CAMPAIGN_IDS)
    tags: list[str] | None = Field(description=_TAGS)
    enabled: bool
    disabled_reason: str | None = Field(
        description="Why it is disabled: an operator's note, a 410 Gone answer, or failing for too long."
    )
    rate_limit: float | None = Field(description=_RATE_LIMIT)
    max_in_flight: int = Field(description=_MAX_IN_FLIGHT)
    batch_size: int = Field(description=_BATCH_SIZE)
    created_at: UtcDateTime
    updated_at: UtcDateTime
    last_success_at: UtcDateTime | None = Field(description="The last 2xx answer.")
    failing_since: UtcDateTime | None = Field(description="The first failure since the last success.")
    circuit_open_until: UtcDateTime | None = Field(
        description="After consecutive failures nothing is sent until then; then one request decides."
    )
    previous_secret_until: UtcDateTime | None = Field(
        description="After a rotation, requests carry a signature by the previous secret too until then."
    )


class EndpointDetailOut(EndpointOut):
    deliveries: DeliveryCounts | None = Field(None, description="The endpoint's deliveries per state.")


_SECRET = "`whsec_…`: receivers verify the `webhook-signature` header with it (Standard Webhooks)."


class CreatedEndpointOut(EndpointOut):
    secret: str = Field(description=_SECRET + " Also at GET /v1/webhooks/{id}/secret.")


class SecretOut(BaseModel):
    secret: str = Field(description=_SECRET)


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: float = Field(
        endpoints.DEFAULT_ROTATION_OVERLAP,
        ge=0,
        le=30 * 86400,
        allow_inf_nan=False,
        description="Seconds the current secret keeps signing too (both signatures are sent), so receivers "
        "can switch without rejecting a delivery; 0: the new secret alone from now on.",
    )


class RotatedOut(BaseModel):
    endpoint: EndpointOut
    secret: str = Field(description="The new secret. " + _SECRET)


class DeliveryOut(BaseModel):
    id: int
    endpoint_id: int
    event_id: int | None = Field(description="The event delivered; null for a test delivery.")
    event_type: str
    webhook_id: str | None = Field(
        description="The `webhook-id` header: the same on every attempt (receivers deduplicate on it); "
        "null for a batched delivery not sent yet."
    )
    state: DeliveryState
    attempts: int = Field(description="Attempts since it was created or replayed.")
    next_attempt_at: UtcDateTime | None = Field(description="When a pending delivery is tried next.")
    created_at: UtcDateTime
    delivered_at: UtcDateTime | None
    last_status: int | None = Field(description="The HTTP status of the last attempt; null: no answer.")
    last_error: str | None = Field(description="Why the last attempt failed.")


class AttemptOut(BaseModel):
    id: int
    webhook_id: str
    attempted_at: UtcDateTime
    status: int | None = Field(description="The HTTP status; null: no answer (`error` says why).")
    error: str | None
    latency_ms: int
    response: str | None = Field(description="The start of the answer's body.")


class DeliveryDetailOut(DeliveryOut):
    payload: dict[str, Any] = Field(description='The body sent: `{"type", "timestamp", "data"}`.')
    attempt_log: list[AttemptOut] = Field(description="Every attempt, oldest first.")


class ReplayRangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime = Field(description="Deliveries created at or after this (ISO 8601; without an offset, UTC).")
    until: datetime | None = Field(None, description="… and before this; default: now.")
    state: Literal["failed", "succeeded", "any"] = Field(
        "failed", description="Only deliveries in this state; `any`: every one not pending."
    )


class ReplayedOut(BaseModel):
    replayed: int = Field(description="How many deliveries will be sent again.")


@router.post("", status_code=201, response_model=CreatedEndpointOut)
def create_endpoint(body: EndpointIn, response: Response, principal: Manager) -> dict[str, Any]:
    """Add an endpoint and return it with its signing secret. It receives the events written from now
    on that its filters (`event_types`, `campaign_ids`, `tags`; all of them) select."""
    endpoint, secret = endpoints.create_endpoint(**body.fields())
    response.headers["Location"] = f"/v1/webhooks/{endpoint['id']}"
    return {**endpoint, "secret": secret}


@router.get("", response_model=Page[EndpointOut])
def list_endpoints(principal: Manager, limit: Limit = 100, cursor: Cursor = None) -> Page[dict[str, Any]]:
    """Endpoints, by id (never their secrets)."""
    position = decode_cursor(cursor, (int,))
    rows = endpoints.list_endpoints(limit=limit + 1, after=position[0] if position else None)
    return page(rows, limit, lambda row: [row["id"]])


@router.get("/{endpoint_id}", response_model=EndpointDetailOut)
def get_endpoint(endpoint_id: EndpointId, principal: Manager) -> dict[str, Any]:
    """One endpoint, with its deliveries per state."""
    return {**endpoints.get_endpoint(endpoint_id), "deliveries": deliveries.counts(endpoint_id)}


@router.patch("/{endpoint_id}", response_model=EndpointOut)
def update_endpoint(endpoint_id: EndpointId, body: EndpointChange, principal: Manager) -> dict[str, Any]:
    """Change the fields given; the others stay. `enabled: true` also closes its circuit (the backlog
    goes out at once)."""
    fields = body.fields()
    enabled = fields.pop("enabled", None)
    reason = fields.pop("disabled_reason", None)
    if reason is not None and enabled is not False:
        raise InvalidInput("is only taken with `enabled: false`", field="disabled_reason")
    endpoint = endpoints.update_endpoint(endpoint_id, **fields) if fields else endpoints.get_endpoint(endpoint_id)
    if enabled is not None:
        endpoint = endpoints.set_enabled(endpoint_id, enabled, reason=reason)
    return endpoint


@router.delete("/{endpoint_id}", status_code=204)
def delete_endpoint(endpoint_id: EndpointId, principal: Manager) -> Response:
    """Remove the endpoint with its deliveries: nothing more is sent to it."""
    endpoints.delete_endpoint(endpoint_id)
    return Response(status_code=204)


@router.get("/{endpoint_id}/secret", response_model=SecretOut)
def get_secret(endpoint_id: EndpointId, principal: Manager) -> dict[str, Any]:
    """The endpoint's current signing secret."""
    return {"secret": endpoints.reveal_secret(endpoint_id)}


@router.post("/{endpoint_id}/rotate-secret", response_model=RotatedOut)
def rotate_secret(endpoint_id: EndpointId, principal: Manager, body: RotateIn = RotateIn()) -> dict[str, Any]:
    """A new signing secret; the current one keeps signing too for `overlap_seconds` (default a day),
    so receivers can switch without rejecting a delivery. The body is optional."""
    endpoint, secret = endpoints.rotate_secret(endpoint_id, overlap_seconds=body.overlap_seconds)
    return {"endpoint": endpoint, "secret": secret}


@router.post("/{endpoint_id}/test", response_model=DeliveryDetailOut)
def send_test_delivery(endpoint_id: EndpointId, principal: Manager) -> dict[str, Any]:
    """POST a `webhook.test` event to the endpoint now (even a disabled one) and return the delivery
    with its attempt: the status, latency and the start of the answer, or the error. A failed test
    is retried on the schedule like any delivery."""
    return deliveries.send_test(endpoint_id)


@router.get("/{endpoint_id}/deliveries", response_model=Page[DeliveryOut])
def list_deliveries(
    endpoint_id: EndpointId,
    principal: Manager,
    limit: Limit = 100,
    cursor: Cursor = None,
    state: Annotated[DeliveryState | None, Query(description="Only deliveries in this state.")] = None,
) -> Page[dict[str, Any]]:
    """The endpoint's deliveries, newest first."""
    position = decode_cursor(cursor, (int,))
    rows = deliveries.list_deliveries(
        endpoint_id, limit=limit + 1, before=position[0] if position else None, state=state
    )
    return page(rows, limit, lambda row: [row["id"]])


@router.get("/{endpoint_id}/deliveries/{delivery_id}", response_model=DeliveryDetailOut)
def get_delivery(endpoint_id: EndpointId, delivery_id: DeliveryId, principal: Manager) -> dict[str, Any]:
    """One delivery with the body sent and every attempt."""
    return deliveries.get_delivery(delivery_id, endpoint_id=endpoint_id)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/replay", status_code=202, response_model=DeliveryDetailOut)
def replay_delivery(endpoint_id: EndpointId, delivery_id: DeliveryId, principal: Manager) -> dict[str, Any]:
    """Send a delivery again, whatever its state, with a fresh retry schedule and its own webhook-id
    (a receiver that processed it already sees a duplicate)."""
    return deliveries.replay(delivery_id, endpoint_id=endpoint_id)


@router.post("/{endpoint_id}/replay", status_code=202, response_model=ReplayedOut)
def replay_range(endpoint_id: EndpointId, body: ReplayRangeIn, principal: Manager) -> dict[str, Any]:
    """Send again the endpoint's deliveries created in [since, until) in `state` (failed ones by
    default), e.g. after the receiver was down for longer than the retry schedule."""
    replayed = deliveries.replay_range(
        endpoint_id,
        body.since,
        body.until,
        state=None if body.state == "any" else body.state,
    )
    return {"replayed": replayed}
