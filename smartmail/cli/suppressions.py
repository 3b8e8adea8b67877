"""`smartmail suppressions …`: list, add and remove the addresses never mailed."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import fail, out
from smartmail.errors import InvalidInput, NotFound

suppressions_app = typer.Typer(help="The suppression list: addresses never mailed.", no_args_is_help=True)


@suppressions_app.command("list")
def list_(
    reason: Annotated[str | None, typer.Option(help="Only this reason (hard_bounce, complaint, …).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    after: Annotated[str | None, typer.Option(help="Start after this address (paging).")] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Suppressed addresses in address order, with why and since when."""
    from smartmail.audience import suppressions

    try:
        rows = suppressions.list_suppressions(limit=limit, after=after, reason=reason)
    except InvalidInput as exc:
        fail(str(exc))
    if json_:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table("email", "reason", "since", "detail")
    for row in rows:
        table.add_row(
            escape(row["email"]), row["reason"], f"{row['created_at']:%Y-%m-%d %H:%M}", escape(row["detail"] or "")
        )
    out.print(table)


@suppressions_app.command("add")
def add(
    email: str,
    reason: Annotated[str, typer.Option(help="manual, hard_bounce, complaint or unsubscribed.")] = "manual",
    detail: Annotated[str | None, typer.Option(help="A note kept with the entry.")] = None,
) -> None:
    """Suppress an address (an address already suppressed keeps its first reason)."""
    from smartmail.audience import suppressions

    try:
        entry, created = suppressions.add_suppression(email, reason, detail)
    except InvalidInput as exc:
        fail(str(exc))
    what = "suppressed" if created else "already suppressed"
    out.print(f"{escape(entry['email'])} {what} ({entry['reason']})")


@suppressions_app.command("remove")
def remove(email: str) -> None:
    """Take an address off the list: a bounced or blocked contact is subscribed again; an
    unsubscribed or complained one keeps its status (consent comes back only from the recipient)."""
    from smartmail.audience import suppressions

    try:
        suppressions.remove_suppression(email)
    except NotFound as exc:
        fail(str(exc), code=1)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"{escape(email)} is no longer suppressed")
