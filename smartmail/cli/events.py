"""`smartmail events tail`: print the event stream as it grows, as text or JSON Lines."""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from typing import Annotated, Any

import typer

from smartmail.cli.output import fail
from smartmail.errors import InvalidInput

events_app = typer.Typer(
    help="The event stream: sends, deliveries, opens, clicks and custom events.", no_args_is_help=True
)


class Format(str, Enum):
    text = "text"
    json = "json"


def _line(event: dict[str, Any], form: Format) -> str:
    if form is Format.json:
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    parts = [event["position"], event["occurred_at"], event["type"], event["email"] or "-"]
    if event["message_id"]:
        parts.append(f"message={event['message_id']}")
    if event["campaign_id"] is not None:
        parts.append(f"campaign={event['campaign_id']}")
    if event["machine"]:
        parts.append("machine")
    if event["properties"]:
        parts.append(json.dumps(event["properties"], ensure_ascii=False, separators=(",", ":")))
    return "  ".join(parts)


@events_app.command("tail")
def tail(
    type_: Annotated[
        list[str], typer.Option("--type", help="Only this event type (repeatable, or comma-separated).")
    ] = [],
    since: Annotated[
        str, typer.Option(help="Where to start: now (the end), all (the beginning) or a position <xact>-<id>.")
    ] = "now",
    follow: Annotated[bool, typer.Option(help="Keep printing events as they are written (Ctrl-C stops).")] = True,
    format_: Annotated[Format, typer.Option("--format", help="text, or json (JSON Lines).")] = Format.text,
    machine: Annotated[bool, typer.Option(help="--no-machine leaves out machine opens and clicks.")] = True,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls when following.")] = 1.0,
) -> None:
    """Print events in stream order; each line starts with its position, which --since takes."""
    from smartmail.audience import event_stream

    types = [name.strip() for value in type_ for name in value.split(",") if name.strip()]
    try:
        kinds = event_stream.check_types(types, field="--type")
        if since == "now":
            position = event_stream.end()
        elif since == "all":
            position = event_stream.START
        else:
            position = event_stream.Position.parse(since, field="--since")
    except InvalidInput as exc:
        fail(f"{exc.field}: {exc.reason}")
    try:
        while True:
            page = event_stream.read(position, types=kinds, include_machine=machine, limit=event_stream.MAX_LIMIT)
            if page.events:
                sys.stdout.write("".join(_line(event, format_) + "\n" for event in page.events))
                sys.stdout.flush()
            position = page.next
            if page.more:
                continue
            if not follow:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a follow ends: not an error
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final flush of
        # stdout from failing again (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
