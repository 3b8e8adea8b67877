"""`smartmail inbound`: the inbound SMTP server; `smartmail inbound-mail`: what it received, and retries."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import fail, out
from smartmail.config import get_settings
from smartmail.errors import InvalidInput, NotFound, SettingsError


async def _serve(host: str, port: int, grace: float) -> None:
    from smartmail.feedback.inbound_server import InboundServer

    try:
        server = InboundServer(get_settings())
    except SettingsError as exc:
        fail(str(exc))
    try:
        await server.start(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tls = ", STARTTLS offered" if server.tls else ""
    out.print(f"inbound SMTP server listening on {host}:{port}{tls}", highlight=False)
    await stop.wait()
    out.print("stopping: no new connections; finishing sessions", highlight=False)
    await server.shutdown(grace)
    out.print(f"stopped ({server.handler.accepted} message(s) accepted)", highlight=False)


def inbound(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: SMARTMAIL_INBOUND_HOST; 0.0.0.0 on an MX).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="TCP port (default: SMARTMAIL_INBOUND_PORT, 2525).")
    ] = None,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds sessions get to finish their mail after SIGTERM.")
    ] = 10.0,
) -> None:
    """Run the inbound SMTP server: bounces (DSNs), complaints and mailto unsubscribes are stored, then processed."""
    settings = get_settings()  # a bad configuration stops here with a message naming the variable
    asyncio.run(_serve(host or settings.inbound_host, port or settings.inbound_port, grace))


inbound_mail_app = typer.Typer(
    help="Mail `smartmail inbound` received: verdicts, bytes, retries.", no_args_is_help=True
)


@inbound_mail_app.command("list")
def list_(
    state: Annotated[str | None, typer.Option(help="pending, processed or failed.")] = None,
    verdict: Annotated[str | None, typer.Option(help="bounce, delayed, complaint, unsubscribe, auto_reply, …")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Inbound mail, newest first, with what it was found to be."""
    from smartmail.feedback import inbound as spool

    try:
        rows = spool.list_inbound(limit=limit, state=state, verdict=verdict)
    except InvalidInput as exc:
        fail(str(exc))
    if json_:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table("id", "received", "state", "verdict", "from", "to", "size", "detail")
    for row in rows:
        detail = (row["outcome"] or {}).get("detail") or (row["outcome"] or {}).get("error") or ""
        table.add_row(
            row["id"],
            f"{row['received_at']:%Y-%m-%d %H:%M:%S}",
            row["state"],
            row["verdict"] or "",
            escape(row["mail_from"] or "<>"),
            escape(", ".join(row["recipients"])),
            str(row["size"]),
            escape(str(detail)),
        )
    out.print(table)


@inbound_mail_app.command("show")
def show(
    inbound_id: str,
    raw: Annotated[bool, typer.Option("--raw", help="Write the mail's bytes as received to stdout.")] = False,
) -> None:
    """One inbound mail: its envelope, state, verdict and outcome (or, with --raw, its bytes)."""
    from smartmail.feedback import inbound as spool

    try:
        if raw:
            sys.stdout.buffer.write(spool.raw_of(inbound_id))
            return
        row = spool.get_inbound(inbound_id)
    except NotFound as exc:
        fail(str(exc), code=1)
    out.print_json(json.dumps(row, default=str))


@inbound_mail_app.command("retry")
def retry(inbound_id: str) -> None:
    """Process a failed mail again, once what made it fail is fixed."""
    from smartmail.feedback import inbound as spool

    try:
        spool.retry(inbound_id)
    except NotFound as exc:
        fail(str(exc), code=1)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"inbound mail {inbound_id} will be processed again")
