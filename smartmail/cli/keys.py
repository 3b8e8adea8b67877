"""`smartmail keys …`: create (the key is printed once), list and revoke HTTP API keys."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import err, fail, iso_time, out
from smartmail.errors import InvalidInput, NotFound

keys_app = typer.Typer(help="HTTP API keys: scoped, hashed, revocable.", no_args_is_help=True)

_DURATION = re.compile(r"(\d+)([dhm])")


def _expiry(value: str | None) -> datetime | None:
    """`30d`, `12h`, `90m`, or an ISO time (naive = UTC), as a naive UTC datetime."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}[unit]
        return datetime.now(UTC).replace(tzinfo=None) + delta
    return iso_time(value, "--expires", "is neither a duration (30d, 12h, 90m) nor an ISO time")


@keys_app.command("create")
def create(
    name: str,
    scope: Annotated[
        list[str],
        typer.Option("--scope", help="A scope (repeatable, or comma-separated); see `smartmail keys scopes`."),
    ] = [],
    expires: Annotated[str | None, typer.Option(help="30d, 12h, 90m or an ISO time; default: never.")] = None,
    rate_limit: Annotated[float | None, typer.Option(help="Requests/s (default: SMARTMAIL_API_RATE_LIMIT).")] = None,
    burst: Annotated[int | None, typer.Option(help="Requests back to back (default: 2 s worth).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the record and key as JSON.")] = False,
) -> None:
    """Create a key and print it: it is shown this once, only its hash is stored."""
    from smartmail.access import keys

    scopes = [s.strip() for value in scope for s in value.split(",") if s.strip()]
    try:
        record, token = keys.create_key(name, scopes, expires_at=_expiry(expires), rate_limit=rate_limit, burst=burst)
    except InvalidInput as exc:
        fail(str(exc))
    if json_:
        out.print_json(json.dumps({**record, "key": token}, default=str))
        return
    out.print(f"created API key {record['id']} ({escape(record['name'])}): {', '.join(record['scopes'])}")
    out.print(token, highlight=False, soft_wrap=True)
    err.print("Store this key now: it is not shown again.")


@keys_app.command("list")
def list_(
    active: Annotated[bool, typer.Option("--active", help="Leave out revoked keys.")] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Keys with their scopes and when they were last used (never their secrets)."""
    from smartmail.access import keys

    records = keys.list_keys(include_revoked=not active)
    if json_:
        out.print_json(json.dumps(records, default=str))
        return
    table = Table()
    table.add_column("id", no_wrap=True)  # copied into `keys revoke`: never wrapped
    for heading in ("name", "scopes", "created", "last used", "expires", "state"):
        table.add_column(heading)
    for r in records:
        state = "revoked" if r["revoked"] else "active"
        table.add_row(
            r["id"],
            escape(r["name"]),
            ", ".join(r["scopes"]),
            f"{r['created_at']:%Y-%m-%d %H:%M}",
            f"{r['last_used_at']:%Y-%m-%d %H:%M}" if r["last_used_at"] else "never",
            f"{r['expires_at']:%Y-%m-%d %H:%M}" if r["expires_at"] else "never",
            state,
        )
    out.print(table)


@keys_app.command("revoke")
def revoke(key_id: str) -> None:
    """Revoke a key: every web process refuses it from the next request on."""
    from smartmail.access import keys

    try:
        keys.revoke_key(key_id)
    except NotFound as exc:
        fail(str(exc), code=1)
    out.print(f"revoked API key {key_id}")


@keys_app.command("scopes")
def scopes() -> None:
    """The scopes a key can hold."""
    from smartmail.access.scopes import SCOPES

    table = Table("scope", "allows")
    for name, allows in SCOPES.items():
        table.add_row(name, allows)
    out.print(table)
