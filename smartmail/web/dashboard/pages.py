"""What the dashboard's pages show, read from the roll-ups, the campaigns' messages and the shaper's state."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

import redis
from markupsafe import Markup
from sqlalchemy import func, select

from smartmail.analytics import kpis, report_html, trends
from smartmail.analytics.rollups import HOUR, SITE, bucket_start
from smartmail.campaigns.lifecycle import campaign_status
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Campaign, CampaignState, Rollup
from smartmail.workers.sites import site_statuses

CAMPAIGNS_SHOWN = 200
FUNNEL = (
    ("sent", "sent"),
    ("delivered", "delivered"),
    ("opened", "opened_unique_human"),
    ("clicked", "clicked_messages_human"),
    ("converted", "converted"),
)


def rate(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def per_second(value: float | None) -> str:
    if value is None:
        return "unlimited"
    return f"{value:.4g}/s" if value >= 1 else f"{value * 60:.4g}/min"


def span(seconds: float | None) -> str:
    """A wait as an operator reads it: `45s`, `9m30s`, `2h05m`."""
    if seconds is None:
        return "–"
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def campaign_href(name: str) -> str:
    return "/dashboard/campaigns/" + quote(name, safe="")


def campaign_list() -> dict[str, Any]:
    """The newest campaigns with their sent count and delivery, open and click-through rates."""
    rows = []
    with get_engine().connect() as connection:
        campaigns = connection.execute(
            select(Campaign.id, Campaign.name, Campaign.state).order_by(Campaign.id.desc()).limit(CAMPAIGNS_SHOWN)
        ).all()
        for campaign in campaigns:
            counts = kpis.campaign_counts(campaign.id, connection=connection)
            found = kpis.kpis_of(counts)
            rows.append(
                {
                    "name": campaign.name,
                    "href": campaign_href(campaign.name),
                    "state": campaign.state,
                    "sent": kpis.quantities(counts)["sent"],
                    "delivery": rate(found["delivery_rate"]["value"]),
                    "open": rate(found["open_rate"]["value"]),
                    "click": rate(found["click_through_rate"]["value"]),
                }
            )
    return {"rows": rows, "limit": CAMPAIGNS_SHOWN}


def campaign_page(name: str) -> dict[str, Any]:
    """One campaign: progress by message state, the funnel, KPIs, the trend chart, the per-domain table.
    NotFound for an unknown campaign."""
    report = trends.campaign_report(name)
    status = campaign_status(str(report["campaign"]["id"]))
    have = kpis.quantities(report["counts"])
    sending = status.state == CampaignState.SENDING.value
    return {
        "campaign": report["campaign"],
        "refresh": 5 if sending else None,
        "progress": {
            "total": status.total,
            "counts": sorted(status.counts.items()),
            "rate": per_second(status.rate) if sending else "–",
            "eta": span(status.eta_seconds) if sending else "–",
            "paused_reason": status.paused_reason,
        },
        # Both SVGs are built by report_html, which escapes every text it places.
        "funnel_svg": Markup(report_html.bars_svg([(label, have[quantity]) for label, quantity in FUNNEL])),
        "kpis": [
            (
                name.replace("_", " "),
                {**kpi, "rate": rate(kpi["value"])},
            )
            for name, kpi in report["kpis"].items()
        ],
        "granularity": report["granularity"],
        "trend_svg": Markup(report_html.trend_svg(report["series"], report["granularity"])),
        "domains": [
            {**row, "delivery": rate(row["delivery_rate"]), "bounce": rate(row["bounce_rate"])}
            for row in report["domains"]
        ],
    }


def site_totals(hours: int = 24) -> tuple[Any, list[dict[str, Any]]]:
    """Sent, deferred and failed per sending site over the last `hours` hourly roll-ups, most sent first."""
    since = bucket_start(utcnow() - timedelta(hours=hours - 1), HOUR)
    query = (
        select(Rollup.value, Rollup.metric, func.sum(Rollup.count))
        .where(
            Rollup.dimension == SITE,
            Rollup.granularity == HOUR,
            Rollup.bucket_start >= since,
            Rollup.metric.in_(("sent", "deferred", "failed")),
        )
        .group_by(Rollup.value, Rollup.metric)
    )
    by_site: dict[str, dict[str, int]] = {}
    with get_engine().connect() as connection:
        for site, metric, total in connection.execute(query):
            by_site.setdefault(site, {})[metric] = int(total)
    rows: list[dict[str, Any]] = []
    for site, counts in by_site.items():
        sent, deferred, failed = (counts.get(m, 0) for m in ("sent", "deferred", "failed"))
        attempts = sent + deferred + failed
        rows.append(
            {
                "site": site,
                "sent": sent,
                "deferred": deferred,
                "failed": failed,
                "deferral_rate": rate(deferred / attempts if attempts else None),
                "failure_rate": rate(failed / attempts if attempts else None),
            }
        )
    rows.sort(key=lambda row: (-row["sent"], row["site"]))
    return since, rows


def held_sites() -> list[dict[str, Any]]:
    """The sites the shaper slows down or suspends now (its shared Redis state, as `smartmail sites` shows)."""
    held = []
    for status in site_statuses():
        state = status.state
        notes = []
        if state.suspended_for:
            notes.append(f"suspended {span(state.suspended_for)} more: {state.suspended_reason}")
        if state.slowed_rate is not None:
            phase = "recovering" if state.recovering else "slowed"
            notes.append(f"{phase} to {per_second(state.slowed_rate)} for {span(state.slowed_for)}")
        if notes:
            held.append(
                {
                    "site": status.site.name,
                    "rate": per_second(status.site.rate),
                    "current": per_second(status.current_rate),
                    "notes": "; ".join(notes),
                    "connections": f"{state.connections}/{status.site.max_connections}",
                    "deferred": status.deferred,
                }
            )
    return held


def sites_page() -> dict[str, Any]:
    since, rows = site_totals()
    page: dict[str, Any] = {"since": f"{since:%Y-%m-%d %H:00}", "rows": rows, "held": [], "shaping_error": None}
    try:
        page["held"] = held_sites()
    except redis.RedisError as exc:  # the roll-ups still show
        page["shaping_error"] = type(exc).__name__
    return page
