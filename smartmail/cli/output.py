"""What every command prints with: the two consoles, `fail` (a message on stderr, a non-zero exit), ISO times."""

from __future__ import annotations

from datetime import datetime
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    # escape: a message quoting input such as '[x]' must not be read as rich markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def iso_time(value: str, option: str, problem: str = "is not an ISO time (2026-05-01T09:00, naive = UTC)") -> datetime:
    """An option's ISO time as the database stores times (naive UTC); else `fail`: option, value, problem."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: {value!r} {problem}")
    from smartmail.store.engine import as_stored

    return as_stored(moment)
