"""`smartmail webhooks …`: endpoints (add, list, enable, disable, remove), secrets, test sends, deliveries, replays."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import err, fail, iso_time, out
from smartmail.errors import InvalidInput, NotFound

webhooks_app = typer.Typer(
    help="Outbound webhooks: endpoints, their signing secrets, deliveries and replays.", no_args_is_help=True
)


def _seconds(value: str, option: str) -> float:
    """`24h`, `30m`, `7d`, `90s` or a number of seconds (the policy file's durations)."""
    from smartmail.workers.policy import parse_duration

    try:
        return parse_duration(value)
    except ValueError:
        fail(f"{option}: {value!r} is not a duration (30s, 30m, 2h, 7d or seconds)")


def _moment(value: str, option: str) -> datetime:
    """`2h` (that long ago), or an ISO time (naive = UTC), as a naive UTC datetime."""
    from smartmail.workers.policy import parse_duration

    try:
        return datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    return iso_time(value, option, "is neither a duration ago (30m, 2h, 7d) nor an ISO time")


def _when(value: datetime | None, never: str = "") -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else never


def _print_secret(secret: str) -> None:
    out.print(secret, highlight=False, soft_wrap=True)
    err.print("Store this secret with the receiver: it verifies each request's webhook-signature with it.")


@webhooks_app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="https:// URL the events are POSTed to.")],
    description: Annotated[str | None, typer.Option(help="A note for people.")] = None,
    event: Annotated[list[str], typer.Option("--event", help="Only this event type (repeatable); default: all.")] = [],
    campaign: Annotated[list[int], typer.Option("--campaign", help="Only this campaign's events (repeatable).")] = [],
    tag: Annotated[list[str], typer.Option("--tag", help="Only messages with this tag (repeatable).")] = [],
    rate_limit: Annotated[float | None, typer.Option(help="Requests per second at most; default: no limit.")] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Requests at once at most (default 10).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Events per request (default 1).")] = None,
) -> None:
    """Add an endpoint: it receives the events written from now on. Prints its id and signing secret."""
    from smartmail.webhooks import endpoints

    given: dict[str, Any] = {
        "description": description,
        "event_types": event or None,
        "campaign_ids": campaign or None,
        "tags": tag or None,
        "rate_limit": rate_limit,
        "max_in_flight": max_in_flight,
        "batch_size": batch_size,
    }
    try:
        endpoint, secret = endpoints.create_endpoint(url, **{k: v for k, v in given.items() if v is not None})
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"added webhook endpoint {endpoint['id']}: {escape(endpoint['url'])}", highlight=False)
    _print_secret(secret)


@webhooks_app.command("list")
def list_(json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Endpoints, with their state, the event types they take, their last success and failure streak."""
    from smartmail.webhooks import endpoints

    rows: list[dict[str, Any]] = []
    while batch := endpoints.list_endpoints(limit=1000, after=rows[-1]["id"] if rows else None):
        rows += batch
    if json_:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table()
    for heading in ("id", "url"):  # copied into the other commands and compared with the receiver's: never wrapped
        table.add_column(heading, no_wrap=True)
    for heading in ("state", "types", "last success", "failing since"):
        table.add_column(heading)
    for row in rows:
        state = "enabled" if row["enabled"] else f"disabled: {row['disabled_reason']}"
        table.add_row(
            str(row["id"]),
            escape(row["url"]),
            escape(state),
            escape(", ".join(row["event_types"] or ["all"])),
            _when(row["last_success_at"], "never"),
            _when(row["failing_since"]),
        )
    out.print(table)


def _set_enabled(endpoint_id: int, enabled: bool, reason: str | None = None) -> None:
    from smartmail.webhooks import endpoints

    try:
        endpoints.set_enabled(endpoint_id, enabled, reason=reason)
    except NotFound as exc:
        fail(str(exc), code=1)
    out.print(f"webhook endpoint {endpoint_id} {'enabled' if enabled else 'disabled'}")


@webhooks_app.command("disable")
def disable(endpoint_id: int, reason: Annotated[str | None, typer.Option(help="Why, shown by `list`.")] = None) -> None:
    """Stop sending to an endpoint; events written while it is disabled are not queued for it."""
    _set_enabled(endpoint_id, False, reason)


@webhooks_app.command("enable")
def enable(endpoint_id: int) -> None:
    """Send to an endpoint again: its circuit closed, its backlog sent at once."""
    _set_enabled(endpoint_id, True)


@webhooks_app.command("remove")
def remove(endpoint_id: int) -> None:
    """Remove an endpoint with its deliveries."""
    from smartmail.webhooks import endpoints

    try:
        endpoints.delete_endpoint(endpoint_id)
    except NotFound as exc:
        fail(str(exc), code=1)
    out.print(f"removed webhook endpoint {endpoint_id}")


@webhooks_app.command("secret")
def secret(endpoint_id: int) -> None:
    """Print an endpoint's current signing secret."""
    from smartmail.webhooks import endpoints

    try:
        value = endpoints.reveal_secret(endpoint_id)
    except NotFound as exc:
        fail(str(exc), code=1)
    out.print(value, highlight=False, soft_wrap=True)


@webhooks_app.command("rotate-secret")
def rotate_secret(
    endpoint_id: int,
    overlap: Annotated[
        str, typer.Option(help="How long the current secret keeps signing too: 24h, 30m, 7d or seconds.")
    ] = "24h",
) -> None:
    """A new signing secret (printed); requests carry signatures by both for --overlap."""
    from smartmail.webhooks import endpoints

    try:
        endpoint, new_secret = endpoints.rotate_secret(endpoint_id, overlap_seconds=_seconds(overlap, "--overlap"))
    except NotFound as exc:
        fail(str(exc), code=1)
    except InvalidInput as exc:
        fail(str(exc))
    until = endpoint["previous_secret_until"]
    out.print(
        f"rotated the secret of webhook endpoint {endpoint_id}"
        + (f"; the previous one also signs until {until:%Y-%m-%d %H:%M} UTC" if until else ""),
        highlight=False,
    )
    _print_secret(new_secret)


def _attempt_line(attempt: dict[str, Any]) -> str:
    answer = f"HTTP {attempt['status']}" if attempt["status"] is not None else "no answer"
    detail = attempt["error"] or (attempt["response"] or "").strip()
    return f"{answer} in {attempt['latency_ms']} ms" + (f": {detail[:200]}" if detail else "")


@webhooks_app.command("test")
def test(endpoint_id: int) -> None:
    """Send a `webhook.test` event now (even to a disabled endpoint) and print the answer; exits
    non-zero unless it was a 2xx."""
    from smartmail.webhooks import deliveries

    try:
        delivery = deliveries.send_test(endpoint_id)
    except NotFound as exc:
        fail(str(exc), code=1)
    attempt = delivery["attempt_log"][-1]
    out.print(escape(_attempt_line(attempt)), highlight=False)
    if delivery["state"] != "succeeded":
        fail(f"the test delivery {delivery['id']} failed; it is retried on the schedule", code=1)


@webhooks_app.command("deliveries")
def list_deliveries(
    endpoint_id: int,
    state: Annotated[str | None, typer.Option(help="pending, succeeded or failed.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    show: Annotated[
        int | None, typer.Option("--show", help="Print this delivery with its payload and attempts instead.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """An endpoint's deliveries, newest first (or one of them in full, with --show)."""
    from smartmail.webhooks import deliveries

    try:
        if show is not None:
            delivery = deliveries.get_delivery(show, endpoint_id=endpoint_id)
            out.print_json(json.dumps(delivery, default=str))
            return
        rows = deliveries.list_deliveries(endpoint_id, limit=limit, state=state)
    except NotFound as exc:
        fail(str(exc), code=1)
    except InvalidInput as exc:
        fail(str(exc))
    if json_:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table("id", "event type", "state", "attempts", "last answer", "next attempt")
    for row in rows:
        answer = f"HTTP {row['last_status']}" if row["last_status"] is not None else ""
        if row["last_error"] and row["last_error"] != answer:
            answer = f"{answer} {row['last_error']}".strip()
        table.add_row(
            str(row["id"]),
            escape(row["event_type"]),
            row["state"],
            str(row["attempts"]),
            escape(answer[:120]),
            _when(row["next_attempt_at"]),
        )
    out.print(table)


@webhooks_app.command("replay")
def replay(
    endpoint_id: int,
    delivery_id: Annotated[int | None, typer.Argument(help="One delivery to send again.")] = None,
    since: Annotated[str | None, typer.Option(help="Deliveries created since: 2h, 7d (ago) or an ISO time.")] = None,
    until: Annotated[str | None, typer.Option(help="… and before: 1h (ago) or an ISO time; default: now.")] = None,
    state: Annotated[str, typer.Option(help="failed, succeeded, or any (every one not pending).")] = "failed",
) -> None:
    """Send again one delivery, or every delivery of a time range (--since) in --state."""
    from smartmail.webhooks import deliveries

    if (delivery_id is None) == (since is None):
        fail("give a DELIVERY_ID or --since (not both)")
    try:
        if delivery_id is not None:
            deliveries.replay(delivery_id, endpoint_id=endpoint_id)
            out.print(f"delivery {delivery_id} will be sent again")
            return
        assert since is not None
        count = deliveries.replay_range(
            endpoint_id,
            _moment(since, "--since"),
            _moment(until, "--until") if until is not None else None,
            state=None if state == "any" else state,
        )
    except NotFound as exc:
        fail(str(exc), code=1)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"{count} deliveries will be sent again")
