"""`smartmail inbound`: run the inbound SMTP server until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from smartmail.cli.output import fail, out
from smartmail.config import get_settings
from smartmail.errors import SettingsError


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
