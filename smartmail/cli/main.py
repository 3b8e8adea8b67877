"""The `smartmail` command line: database, sending, workers, the local sink, status and the demo."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import err, fail, out
from smartmail.config.settings import SettingsError, get_settings
from smartmail.logs import configure as configure_logging

app = typer.Typer(
    help="SmartMail: self-hosted email sending on Celery, Redis and SMTP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
templates_app = typer.Typer(help="Templates stored in the database (versioned).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(templates_app, name="templates")
from smartmail.cli.audience import contacts_app, lists_app, segments_app  # noqa: E402
from smartmail.cli.campaigns import campaign_app  # noqa: E402
from smartmail.cli.dkim import dkim_app  # noqa: E402
from smartmail.cli.events import events_app  # noqa: E402
from smartmail.cli.inbound import inbound, inbound_mail_app  # noqa: E402
from smartmail.cli.keys import keys_app  # noqa: E402
from smartmail.cli.report import report_app  # noqa: E402
from smartmail.cli.suppressions import suppressions_app  # noqa: E402
from smartmail.cli.webhooks import webhooks_app  # noqa: E402
from smartmail.cli.workflows import workflows_app  # noqa: E402

app.add_typer(contacts_app, name="contacts")
app.add_typer(lists_app, name="lists")
app.add_typer(segments_app, name="segments")
app.add_typer(campaign_app, name="campaign")
app.add_typer(events_app, name="events")
app.add_typer(keys_app, name="keys")
app.add_typer(suppressions_app, name="suppressions")
app.add_typer(dkim_app, name="dkim")
app.command()(inbound)
app.add_typer(inbound_mail_app, name="inbound-mail")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(workflows_app, name="workflows")
app.add_typer(report_app, name="report")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or upgrade the database schema."""
    from smartmail.config import get_settings
    from smartmail.store import migrate

    migrate.upgrade(get_settings().database_url, revision)
    out.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base.")) -> None:
    """Roll the schema back."""
    from smartmail.config import get_settings
    from smartmail.store import migrate

    migrate.downgrade(get_settings().database_url, revision)
    out.print(f"database at revision {revision}")


@templates_app.command("save")
def templates_save(
    name: str,
    subject: Annotated[str, typer.Option(help="Subject template.")],
    html_file: Annotated[Path, typer.Option("--html-file", exists=True, dir_okay=False, help="HTML body template.")],
    text_file: Annotated[Path | None, typer.Option("--text-file", exists=True, dir_okay=False)] = None,
    preheader: Annotated[str | None, typer.Option(help="Hidden preview text after the subject (Jinja ok).")] = None,
) -> None:
    """Store a new version of a template (checked for syntax errors first)."""
    from smartmail.content import rendering, template_store
    from smartmail.store.engine import session_scope

    html = html_file.read_text(encoding="utf-8")
    text = text_file.read_text(encoding="utf-8") if text_file else None
    try:
        rendering.check_template_source(subject, html, text)
        with session_scope() as session:
            row = template_store.save_template(
                session, name, subject=subject, html=html, text=text, preheader=preheader
            )
    except (rendering.TemplateError, ValueError) as exc:
        fail(str(exc))
    out.print(f"saved {row.name}@{row.version}")


def _parse_header(values: list[str]) -> dict[str, str]:
    headers = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep:
            fail(f"--header: {value!r} is not NAME:VALUE")
        headers[name.strip()] = content.strip()
    return headers


@app.command()
def send(
    to: Annotated[str | None, typer.Option(help="Recipient, e.g. 'Ann <ann@example.org>'.")] = None,
    template: Annotated[str | None, typer.Option(help="Template name, or NAME@VERSION.")] = None,
    subject: Annotated[str | None, typer.Option()] = None,
    html: Annotated[str | None, typer.Option()] = None,
    text: Annotated[str | None, typer.Option()] = None,
    context: Annotated[str | None, typer.Option(help="Template variables as a JSON object.")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Sender; default SMARTMAIL_DEFAULT_SENDER.")] = None,
    reply_to: Annotated[str | None, typer.Option()] = None,
    header: Annotated[list[str], typer.Option(help="Extra header NAME:VALUE (repeatable).")] = [],
    tag: Annotated[list[str], typer.Option(help="Tag (repeatable).")] = [],
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    send_at: Annotated[datetime | None, typer.Option(help="ISO time; naive times are UTC.")] = None,
    track: Annotated[
        bool | None, typer.Option("--track/--no-track", help="Track opens and clicks (default: the setting).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="JSON file: one message object or a list (send_many).", exists=True, dir_okay=False),
    ] = None,
) -> None:
    """Queue email: from flags, or from a JSON file of message objects with the same field names."""
    import smartmail

    if file is not None:
        try:
            payload = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            fail(f"--file: not valid JSON: {exc}")
        specs = payload if isinstance(payload, list) else [payload]
        if not all(isinstance(s, dict) for s in specs):
            fail("--file: expected a JSON object or a list of objects")
        for spec in specs:
            if "from" in spec:
                spec["from_"] = spec.pop("from")
            if isinstance(spec.get("send_at"), str):
                try:
                    spec["send_at"] = datetime.fromisoformat(spec["send_at"])
                except ValueError:
                    fail(f"send_at: {spec['send_at']!r} is not an ISO 8601 time")
    else:
        if to is None:
            fail("--to (or --file) is required")
        try:
            parsed_context = json.loads(context) if context else {}
        except json.JSONDecodeError as exc:
            fail(f"--context: not valid JSON: {exc}")
        specs = [
            {
                "to": to,
                "template": template,
                "subject": subject,
                "html": html,
                "text": text,
                "context": parsed_context,
                "from_": from_,
                "reply_to": reply_to,
                "headers": _parse_header(header),
                "tags": tag,
                "idempotency_key": idempotency_key,
                "send_at": send_at,
                "track": track,
            }
        ]
    try:
        results = smartmail.send_many(specs)
    except smartmail.InvalidMessage as exc:
        fail(str(exc))
    for result in results:
        note = f" ({result.reason})" if result.reason else ""
        note += " (duplicate idempotency key: earlier message)" if result.duplicate else ""
        out.print(f"{result.id} {result.state}{note}", highlight=False)


@app.command()
def status(message_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a message's state and the relay's last reply."""
    from smartmail.producer.status import status as lookup

    info = lookup(message_id)
    if info is None:
        fail(f"no message with id {message_id}", code=1)
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


def _rate(value: float | None) -> str:
    if value is None:
        return "unlimited"
    return f"{value:.4g}/s" if value >= 1 else f"{value * 60:.4g}/min"


def _span(seconds: float) -> str:
    """A wait as an operator reads it: `45s`, `9m30s`, `2h05m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds % 60 else f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# The Redis counter `throttled` counts holds: each time shaping held a message back instead of
# sending it (rate, suspension, connection limit), so one message held three times counts three.
_SITE_COLUMNS = ("site", "domains", "rate", "now", "burst", "connections", "deferred", "sent", "holds", "notes")


def _site_notes(s) -> str:
    """What is in force at the site: a suspension, or a slow-down and when it is back at full rate."""
    notes = []
    if s.state.suspended_for:
        notes.append(f"suspended {_span(s.state.suspended_for)} more: {s.state.suspended_reason}")
    if s.state.slowed_rate is not None:
        back = "full rate" if s.site.rate is not None else "lifts"
        phase = "recovering" if s.state.recovering else "slowed"
        step = f", next step in {_span(s.state.next_step_in)}" if s.state.next_step_in is not None else ""
        notes.append(f"{phase} to {_rate(s.state.slowed_rate)}{step}, {back} in {_span(s.state.slowed_for)}")
    return "; ".join(notes)


def _site_row(s, all_domains: bool) -> list[str]:
    if all_domains:
        domains = ",".join(s.domains)
    else:
        domains = (s.domains[0] + (f" +{len(s.domains) - 1}" if len(s.domains) > 1 else "")) if s.domains else ""
    return [
        s.site.name,
        domains,
        _rate(s.site.rate),
        _rate(s.current_rate),
        str(s.site.burst) if s.site.rate is not None else "-",
        f"{s.state.connections}/{s.site.max_connections}",
        str(s.deferred),
        str(s.state.counters.get("sent", 0)),
        str(s.state.counters.get("throttled", 0)),
        _site_notes(s),
    ]


def _site_json(s) -> dict:
    return {
        "site": s.site.name,
        "domains": s.domains,
        "rate": s.site.rate,
        "current_rate": s.current_rate,
        "burst": s.site.burst if s.site.rate is not None else None,  # an unlimited site has no bucket
        "connections": s.state.connections,
        "max_connections": s.site.max_connections,
        "deferred": s.deferred,
        "slowed_rate": s.state.slowed_rate,
        "slowed_for": s.state.slowed_for,
        "recovering": s.state.recovering,
        "next_step_in": s.state.next_step_in,
        "suspended_for": s.state.suspended_for,
        "suspended_reason": s.state.suspended_reason,
        "counters": s.state.counters,
    }


@app.command()
def sites(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show each site's configured and current rate, connections, deferred mail, slow-downs and suspensions.

    On a terminal a table; piped, one tab-separated line per site with nothing cut short.
    """
    from smartmail.workers.policy import PolicyError
    from smartmail.workers.sites import site_statuses

    try:
        statuses = site_statuses()
    except PolicyError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps([_site_json(s) for s in statuses]))
        return
    if not out.is_terminal:
        # A table sized for a terminal cuts cells short, and its borders get in the way of
        # grep, cut and awk: piped output is plain TSV, every domain listed.
        lines = [_SITE_COLUMNS] + [_site_row(s, all_domains=True) for s in statuses]
        sys.stdout.write("".join("\t".join(" ".join(c.split()) for c in line) + "\n" for line in lines))
        return
    table = Table(*_SITE_COLUMNS)
    for s in statuses:
        cells = [escape(cell) for cell in _site_row(s, all_domains=False)]  # a reply may read as markup
        table.add_row(*cells, style="red" if s.state.suspended_for else None)
    out.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option("-Q", "--queues")] = "transactional,default",
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency")] = None,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads.")] = "prefork",
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "INFO",
) -> None:
    """Run a Celery worker (extra arguments go to `celery worker`)."""
    from smartmail.workers.app import app as celery_app

    argv = ["worker", "-Q", queues, "--pool", pool, "-l", loglevel, "--without-gossip", "--without-mingle"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    celery_app.worker_main(argv + list(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "INFO",
    schedule: Annotated[Path, typer.Option(help="Where beat keeps its schedule state.")] = Path("celerybeat-schedule"),
) -> None:
    """Run Celery beat: queue due messages and reconcile with Redis on a schedule."""
    from smartmail.workers.app import app as celery_app

    celery_app.start(["beat", "-l", loglevel, "-s", str(schedule)] + list(ctx.args))


@app.command()
def sink(
    host: str = "127.0.0.1",
    port: int = 8025,
    directory: Annotated[Path | None, typer.Option("--dir", help="Store each message as an .eml file here.")] = None,
    quiet: Annotated[bool, typer.Option(help="Do not print a line per message.")] = False,
) -> None:
    """Run a local SMTP server that accepts everything and prints and/or stores it."""
    from smartmail.devtools.sink import SinkHandler, start_sink

    handler = SinkHandler(directory=directory, echo=not quiet, keep=False)
    controller = start_sink(handler, host, port)
    out.print(f"SMTP sink listening on {host}:{port}" + (f", storing in {directory}" if directory else ""))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
        out.print(f"received {handler.count} message(s)")


@app.command()
def web(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="uvicorn worker processes (default: SMARTMAIL_WEB_WORKERS).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, max=200, help="Threads per process for the API's routes (default: SMARTMAIL_WEB_THREADS, 10)."
        ),
    ] = None,
) -> None:
    """Run the web app (the HTTP API under /v1, /docs, unsubscribe pages, /healthz) with uvicorn."""
    import os

    import uvicorn

    if threads is not None:
        os.environ["SMARTMAIL_WEB_THREADS"] = str(threads)  # the worker processes read their settings anew
        get_settings.forget()
    settings = get_settings()  # a bad configuration stops here with a message naming the variable
    uvicorn.run(
        "smartmail.web.app:app",
        host=host,
        port=port,
        workers=workers or settings.web_workers,
        log_level=settings.log_level.lower(),
        access_log=False,  # the app logs each request itself, with its request id and API key id
        proxy_headers=False,  # behind a proxy, set FORWARDED_ALLOW_IPS and run uvicorn directly
        server_header=False,
    )


@app.command()
def demo(count: Annotated[int, typer.Option(help="How many emails to send.")] = 5) -> None:
    """Start what is missing (Redis, SQLite, a sink, a worker), send personalized emails, show what arrived."""
    from smartmail.devtools.demo import run

    sys.exit(run(count, out))


def main() -> None:
    try:
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)
    except SettingsError:
        pass  # commands that need settings report the problem themselves
    try:
        app()
    except SettingsError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
