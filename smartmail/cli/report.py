"""`smartmail report …`: a campaign's KPIs, domains and links; trends over time; as a table, JSON, CSV or HTML."""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import err, fail, iso_time, out
from smartmail.errors import InvalidInput, NotFound

report_app = typer.Typer(help="Analytics reports from the roll-ups: campaigns and trends.", no_args_is_help=True)

BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths of a cell: bars finer than one character
BAR_WIDTH = 40


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class By(str, Enum):
    day = "day"
    hour = "hour"


FormatOption = Annotated[Format, typer.Option("--format", help="table (with a chart), json or csv.")]
HtmlOption = Annotated[
    Path | None, typer.Option("--html", dir_okay=False, help="Also write the report as one self-contained HTML file.")
]


def _since(value: str, option: str) -> datetime:
    """`30d`, `12h` (that long ago) or an ISO time (naive = UTC)."""
    from smartmail.workers.policy import parse_duration

    try:
        return datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    return iso_time(value, option, "is neither a duration ago (12h, 30d) nor an ISO time")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat() + "Z"
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _bar(value: float, top: float) -> str:
    eighths = round(value / top * BAR_WIDTH * 8) if top else 0
    return "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")


def _write_csv(header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
    sys.stdout.write(buffer.getvalue())


def _write_html(path: Path, page: str) -> None:
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(f"--html: cannot write {path}: {exc.strerror}")
    err.print(f"wrote {escape(str(path))}", highlight=False)  # stderr: stdout holds the report


def _kpi_rows(kpis: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[name, kpi["value"], kpi["numerator"], kpi["denominator"]] for name, kpi in kpis.items()]


def _kpi_table(kpis: dict[str, dict[str, Any]]) -> Table:
    table = Table("KPI", "rate", "numerator", "denominator", "of", title="KPIs")
    for name, kpi in kpis.items():
        of = f"{kpi['numerator_is'].split(':')[0]} / {kpi['denominator_is'].split(':')[0]}"
        table.add_row(name, _rate(kpi["value"]), str(kpi["numerator"]), str(kpi["denominator"]), escape(of))
    return table


def _series_rows(buckets: list[dict[str, Any]]) -> list[list[Any]]:
    from smartmail.analytics.kpis import quantities

    rows = []
    for bucket in buckets:
        have, kpis = quantities(bucket["counts"]), bucket["kpis"]
        rows.append(
            [
                _jsonable(bucket["start"]),
                have["sent"],
                have["delivered"],
                have["bounced"],
                have["opened_unique_human"],
                have["clicked_messages_human"],
                kpis["delivery_rate"]["value"],
                kpis["open_rate"]["value"],
                kpis["click_through_rate"]["value"],
            ]
        )
    return rows


SERIES_HEADER = ["start", "sent", "delivered", "bounced", "opened", "clicked", "delivery_rate", "open_rate", "ctr"]


def _series_table(buckets: list[dict[str, Any]], granularity: str) -> Table:
    rows = _series_rows(buckets)
    top = max([0] + [row[1] for row in rows])
    table = Table("from", "sent", "", "delivered", "bounced", "opened", "clicked", "delivery", "open", "ctr")
    table.columns[2].no_wrap = True
    for row, bucket in zip(rows, buckets):
        start = f"{bucket['start']:%Y-%m-%d %H:00}" if granularity == "hour" else f"{bucket['start']:%Y-%m-%d}"
        table.add_row(start, str(row[1]), _bar(row[1], top), *map(str, row[2:6]), *map(_rate, row[6:]))
    return table


@report_app.command("campaign")
def campaign(
    name: Annotated[str, typer.Argument(help="The campaign's name (or id).")],
    format_: FormatOption = Format.table,
    html: HtmlOption = None,
) -> None:
    """A campaign's KPIs (with numerators and denominators), its trend, delivery by domain and top links.

    csv: one line per KPI (kpi, value, numerator, denominator)."""
    from smartmail.analytics import report_html, trends

    try:
        report = trends.campaign_report(name)
    except NotFound as exc:
        fail(str(exc), code=1)
    if html is not None:
        _write_html(html, report_html.campaign_html(report, generated_at=datetime.now(UTC)))
    if format_ is Format.json:
        out.print_json(json.dumps(_jsonable(report)))
    elif format_ is Format.csv:
        _write_csv(["kpi", "value", "numerator", "denominator"], _kpi_rows(report["kpis"]))
    else:
        out.print(f"campaign {escape(report['campaign']['name'])} ({report['campaign']['state']})", highlight=False)
        out.print(_kpi_table(report["kpis"]))
        out.print(_series_table(report["series"], report["granularity"]))
        domains = Table("domain", "messages", "sent", "failed", "bounced", "deferred", "delivery", "bounce")
        for row in report["domains"]:
            domains.add_row(
                escape(row["domain"]),
                *(str(row[k]) for k in ("messages", "sent", "failed", "bounced", "deferred")),
                _rate(row["delivery_rate"]),
                _rate(row["bounce_rate"]),
            )
        out.print(domains)
        if report["top_links"]:
            links = Table("link", "clicks", "unique", title="top links")
            for link in report["top_links"]:
                links.add_row(escape(link["url"]), str(link["clicks"]), str(link["unique"]))
            out.print(links)


@report_app.command("trends")
def trends_(
    since: Annotated[str, typer.Option(help="From that long ago (30d, 12h) or an ISO time (naive = UTC).")] = "30d",
    until: Annotated[str | None, typer.Option(help="Up to this ISO time (naive = UTC); default now.")] = None,
    by: Annotated[By, typer.Option("--by", help="One row per day or per hour.")] = By.day,
    campaign: Annotated[str | None, typer.Option(help="Only this campaign's mail (name or id).")] = None,
    tag: Annotated[str | None, typer.Option(help="Only the messages with this tag.")] = None,
    format_: FormatOption = Format.table,
    html: HtmlOption = None,
) -> None:
    """Counts and KPIs per day or hour (empty ones included), with a bar chart of messages sent.

    csv: one line per day or hour."""
    from smartmail.analytics import report_html, trends

    start = _since(since, "--since")
    end = iso_time(until, "--until") if until is not None else None
    try:
        report = trends.trends_report(since=start, until=end, granularity=by.value, campaign=campaign, tag=tag)
    except NotFound as exc:
        fail(f"--campaign: {exc}", code=1)
    except InvalidInput as exc:
        option = {"since": "--since", "until": "--until", "granularity": "--by", "tag": "--tag"}.get(
            exc.field or "", "--since"
        )
        fail(f"{option}: {exc.reason}")
    if html is not None:
        _write_html(html, report_html.trends_html(report, generated_at=datetime.now(UTC)))
    if format_ is Format.json:
        out.print_json(json.dumps(_jsonable(report)))
    elif format_ is Format.csv:
        _write_csv(SERIES_HEADER, _series_rows(report["series"]))
    else:
        out.print(_kpi_table(report["kpis"]))
        out.print(_series_table(report["series"], report["granularity"]))


@report_app.command("rebuild")
def rebuild(
    since: Annotated[
        str | None, typer.Option(help="Only the buckets from this day on (30d, or an ISO time); default: all.")
    ] = None,
) -> None:
    """Rebuild the roll-ups from the raw events (after changing the conversion settings, or to repair
    them): in one transaction the buckets go and the stream is read again up to where it was."""
    from smartmail.analytics import rollups

    start = _since(since, "--since") if since is not None else None
    with err.status("rolling up the event stream again…"):
        events = rollups.rebuild(start)
    out.print(f"rebuilt from {events} events", highlight=False)
