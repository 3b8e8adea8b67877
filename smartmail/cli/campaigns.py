"""`smartmail campaign …`: create, schedule, launch, pause, resume, cancel, and watch a campaign's progress."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from smartmail.audience.contacts import InvalidInput, NotFound
from smartmail.campaigns import lifecycle as campaigns
from smartmail.cli.output import err, out

campaign_app = typer.Typer(help="Campaigns: one template to lists and segments, now or later.", no_args_is_help=True)


def _run(action, *args, **kwargs):
    """Call the API; bad input exits 2 and an unknown campaign 1, each with a message."""
    try:
        return action(*args, **kwargs)
    except InvalidInput as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except NotFound as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None


@campaign_app.command("create")
def create(
    name: str,
    template: Annotated[str, typer.Option(help="Template name (NAME or NAME@VERSION).")],
    list_: Annotated[list[str], typer.Option("--list", help="Audience list (repeatable).")] = [],  # noqa: B006
    segment: Annotated[str | None, typer.Option(help="A saved segment's name.")] = None,
    from_: Annotated[str | None, typer.Option("--from")] = None,
    reply_to: Annotated[str | None, typer.Option()] = None,
    send_at: Annotated[datetime | None, typer.Option(help="ISO time (naive = UTC); scheduled if given.")] = None,
    window: Annotated[
        str | None, typer.Option(help='Daily send window in the recipient\'s time zone, "08:00-20:00".')
    ] = None,
    window_timezone: Annotated[str, typer.Option(help="Time zone for contacts without one.")] = "UTC",
    rate_cap: Annotated[float | None, typer.Option(help="Campaign-wide messages per second.")] = None,
    tag: Annotated[list[str], typer.Option(help="Tag (repeatable).")] = [],  # noqa: B006
    resend_unknown: Annotated[
        bool, typer.Option(help="At-least-once: re-send messages a worker crash left unknown (duplicates possible).")
    ] = False,
    tracking: Annotated[bool, typer.Option(help="Open and click tracking.")] = True,
    utm: Annotated[
        list[str], typer.Option(help="UTM parameter for tracked links, KEY=VALUE, e.g. utm_source=news (repeatable).")
    ] = [],  # noqa: B006
    preheader: Annotated[str | None, typer.Option(help="Hidden preview text; replaces the template's.")] = None,
    ab_test: Annotated[
        str | None,
        typer.Option(help="An A/B test as JSON, or @FILE holding it: {variants: [...], test_share, duration, …}."),
    ] = None,
) -> None:
    """Create a campaign (a draft, or scheduled with --send-at)."""
    created = _run(
        campaigns.create_campaign,
        name,
        template=template,
        lists=list_,
        segment=segment,
        from_=from_,
        reply_to=reply_to,
        send_at=send_at,
        window=window,
        window_timezone=window_timezone,
        rate_cap=rate_cap,
        tags=tag,
        resend_unknown=resend_unknown,
        tracking=tracking,
        utm=_run(_parse_utm, utm),
        preheader=preheader,
        ab_test=_run(_parse_ab_test, ab_test),
    )
    out.print(f"campaign {escape(name)} created ({created['state']})")


def _parse_ab_test(value: str | None) -> Any:
    """`--ab-test` as an object: JSON, or `@FILE` naming a JSON file (checked by the campaign)."""
    if value is None:
        return None
    try:
        source = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
        return json.loads(source)
    except OSError as exc:
        raise InvalidInput(f"cannot read {value[1:]!r}: {exc.strerror}", field="ab_test") from None
    except ValueError as exc:
        raise InvalidInput(f"is not JSON: {exc}", field="ab_test") from None


@campaign_app.command("ab-test")
def ab_test(
    name: str,
    test: Annotated[str, typer.Argument(help="The A/B test as JSON, @FILE holding it, or null to remove it.")],
) -> None:
    """Set (or with null remove) a draft or scheduled campaign's A/B test."""
    changed = _run(campaigns.update_campaign, name, ab_test=_run(_parse_ab_test, test))
    if changed["ab_test"] is None:
        out.print(f"campaign {escape(name)}: no A/B test")
        return
    variants = ", ".join(v["name"] for v in changed["ab_test"]["variants"])
    out.print(f"campaign {escape(name)}: A/B test of {escape(variants)} (seed {changed['ab_test']['seed']})")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


@campaign_app.command("ab-report")
def ab_report(
    name: str,
    format_: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Each variant's sent, unique human opens and clicks, conversions and rates, with a z-test
    against the leader; says when a difference is not significant."""
    if format_ not in ("table", "json"):
        _run(_fail, InvalidInput("must be table or json", field="format"))
    found = _run(campaigns.ab_report, name)
    if format_ == "json":
        out.print_json(json.dumps(found, default=str))
        return
    _print_ab_report(found)


def _fail(error: Exception) -> None:
    raise error


def _print_ab_report(found: dict[str, Any]) -> None:
    metric = found["metric"]
    table = Table(
        "variant",
        "subject",
        "sent",
        "opens",
        "clicks",
        "conversions",
        "open rate",
        "click rate",
        "conv. rate",
        "z",
        "p",
        "vs leader",
        title=f"A/B test of {found['campaign']} ({metric})",
    )
    for row in found["variants"]:
        table.add_row(
            escape(row["name"]),
            escape(row["subject"] or ""),
            str(row["sent"]),
            str(row["opens"]),
            str(row["clicks"]),
            "-" if row["conversions"] is None else str(row["conversions"]),
            _percent(row["open_rate"]),
            _percent(row["click_rate"]),
            _percent(row["conversion_rate"]),
            "-" if row["z"] is None else f"{row['z']:.2f}",
            "-" if row["p_value"] is None else f"{row['p_value']:.4f}",
            escape(row["verdict"]),
        )
    out.print(table)
    out.print(escape(found["conclusion"]))
    if found["winner"]:
        out.print(f"winner: {escape(found['winner'])} (picked {found['decided_at']})")
    elif found["decide_at"]:
        how = "picked automatically" if found["auto_winner"] else "to pick: smartmail campaign ab-winner"
        out.print(f"test over at {found['decide_at']} UTC; winner {how}")


@campaign_app.command("ab-winner")
def ab_winner(
    name: str,
    variant: Annotated[str | None, typer.Option(help="The winner; default: the leader by the test's metric.")] = None,
) -> None:
    """Pick the A/B test's winner now; the rest of the audience gets it."""
    found = _run(campaigns.pick_ab_winner, name, variant)
    out.print(f"campaign {escape(name)}: winner {escape(found['winner'])}; the rest of the audience gets it")


def _parse_utm(values: list[str]) -> dict[str, str] | None:
    """`--utm KEY=VALUE` options as an object (checked by the campaign)."""
    utm: dict[str, str] = {}
    for value in values:
        key, sep, content = value.partition("=")
        if not sep:
            raise InvalidInput(f"{value!r} is not KEY=VALUE", field="utm")
        utm[key.strip()] = content
    return utm or None


@campaign_app.command("schedule")
def schedule(name: str, send_at: Annotated[datetime, typer.Argument(help="ISO time; naive times are UTC.")]) -> None:
    """Start the campaign at SEND_AT (beat starts it)."""
    _run(campaigns.schedule_campaign, name, send_at)
    out.print(f"campaign {escape(name)} scheduled for {send_at.isoformat()}")


@campaign_app.command("launch")
def launch(name: str) -> None:
    """Start sending now."""
    _run(campaigns.launch_campaign, name)
    out.print(f"campaign {escape(name)} launched")


@campaign_app.command("pause")
def pause(name: str) -> None:
    """Stop sending; every worker stops claiming its messages at once."""
    _run(campaigns.pause_campaign, name)
    out.print(f"campaign {escape(name)} paused")


@campaign_app.command("resume")
def resume(name: str) -> None:
    """Go on sending a paused campaign."""
    _run(campaigns.resume_campaign, name)
    out.print(f"campaign {escape(name)} resumed")


@campaign_app.command("cancel")
def cancel(name: str) -> None:
    """Send nothing more; unsent messages become cancelled."""
    count = _run(campaigns.cancel_campaign, name)
    out.print(f"campaign {escape(name)} cancelled; {count} unsent message(s) cancelled")


def _print_status(status: campaigns.CampaignStatus) -> None:
    out.print(_table(status))
    feedback = status.feedback
    if any(feedback.values()):
        out.print(
            f"after delivery: {feedback['hard_bounces']} hard bounce(s), {feedback['soft_bounces']} soft bounce(s), "
            f"{feedback['complaints']} complaint(s)"
        )
    if status.paused_reason:
        when = "" if status.state == "paused" else f" (earlier; it is {status.state} now)"
        out.print(f"paused itself{when}: {escape(status.paused_reason)}")


def _table(status: campaigns.CampaignStatus) -> Table:
    table = Table("campaign", "state", "messages", *sorted(status.counts), "rate", "eta")
    eta = f"{status.eta_seconds:.0f}s" if status.eta_seconds is not None else "-"
    table.add_row(
        status.name,
        status.state,
        str(status.total),
        *(str(status.counts[k]) for k in sorted(status.counts)),
        f"{status.rate:.1f}/s",
        eta,
    )
    return table


@campaign_app.command("status")
def status(
    name: str,
    watch: Annotated[bool, typer.Option("--watch", help="A live progress bar until it ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Counts per state, rate over the last minute and the time left."""
    current = _run(campaigns.campaign_status, name)
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "name": current.name,
                    "state": current.state,
                    "counts": current.counts,
                    "total": current.total,
                    "rate": current.rate,
                    "eta_seconds": current.eta_seconds,
                    "fanned_out": current.fanned_out,
                    "feedback": current.feedback,
                    "paused_reason": current.paused_reason,
                }
            )
        )
        return
    if not watch:
        _print_status(current)
        return
    final = ("sent", "bounced", "failed", "suppressed", "unknown", "cancelled")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=out,
    ) as progress:
        task = progress.add_task(name, total=max(current.total, 1), rate="")
        while True:
            done = sum(current.counts.get(k, 0) for k in final)
            progress.update(
                task,
                total=max(current.total, 1),
                completed=done,
                description=f"{name} ({current.state})",
                rate=f"{current.rate:.1f}/s",
            )
            if current.state in ("sent", "cancelled"):
                break
            time.sleep(1)
            current = campaigns.campaign_status(name)
    _print_status(current)
