"""Campaign and trends reports as one self-contained HTML file: inline CSS, charts as inline SVG, no scripts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any

from smartmail.analytics import kpis

# The series drawn, with their colours (the palette reads in print and for the common colour blindnesses).
LINES = (
    ("sent", "#4363d8"),
    ("opened_unique_human", "#3cb44b"),
    ("clicked_messages_human", "#f58231"),
    ("bounced", "#e6194b"),
)
WIDTH, HEIGHT, PAD = 760, 260, 44

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222}
body{margin:2em auto;max-width:800px;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{padding:.25em .6em;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}th{background:#f6f6f6}
.muted{color:#777;font-size:.9em}.legend span{display:inline-block;margin-right:1.2em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
svg text{font:11px sans-serif;fill:#555}
"""


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _when(moment: datetime, granularity: str) -> str:
    return f"{moment:%Y-%m-%d %H:00}" if granularity == "hour" else f"{moment:%Y-%m-%d}"


def _point_values(bucket: dict[str, Any]) -> dict[str, int]:
    have = kpis.quantities(bucket["counts"])
    return {name: have[name] for name, _ in LINES}


def trend_svg(buckets: Sequence[dict[str, Any]], granularity: str) -> str:
    """A line chart of the LINES per bucket, each bucket a point (a circle with its number as title)."""
    values = [_point_values(bucket) for bucket in buckets]
    top = max([1] + [v for point in values for v in point.values()])
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    step = inner_w / max(len(buckets) - 1, 1)
    x = lambda i: PAD + (i * step if len(buckets) > 1 else inner_w / 2)
    y = lambda v: PAD + inner_h - v / top * inner_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="trend chart">',
        f'<line x1="{PAD}" y1="{PAD + inner_h}" x2="{PAD + inner_w}" y2="{PAD + inner_h}" stroke="#999"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{PAD + inner_h}" stroke="#999"/>',
        f'<text x="{PAD - 6}" y="{PAD + 4}" text-anchor="end">{top}</text>',
        f'<text x="{PAD - 6}" y="{PAD + inner_h + 4}" text-anchor="end">0</text>',
    ]
    if buckets:
        for index in sorted({0, len(buckets) // 2, len(buckets) - 1}):
            label = escape(_when(buckets[index]["start"], granularity))
            parts.append(f'<text x="{x(index):.1f}" y="{HEIGHT - 14}" text-anchor="middle">{label}</text>')
    for name, colour in LINES:
        points = " ".join(f"{x(i):.1f},{y(point[name]):.1f}" for i, point in enumerate(values))
        parts.append(
            f'<polyline class="series" data-metric="{name}" fill="none" stroke="{colour}" '
            f'stroke-width="2" points="{points}"/>'
        )
        for i, point in enumerate(values):
            title = escape(f"{_when(buckets[i]['start'], granularity)} {name}: {point[name]}")
            parts.append(
                f'<circle class="point" data-metric="{name}" data-value="{point[name]}" cx="{x(i):.1f}" '
                f'cy="{y(point[name]):.1f}" r="2.5" fill="{colour}"><title>{title}</title></circle>'
            )
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{c}"></i>{escape(n)}</span>' for n, c in LINES)
    return "\n".join(parts) + f'\n<div class="legend">{legend}</div>'


def bars_svg(rows: Sequence[tuple[str, float]], *, unit: str = "") -> str:
    """Horizontal bars, one per (label, value)."""
    top = max([1.0] + [value for _, value in rows])
    height = 22 * len(rows) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" role="img" aria-label="bar chart">'
    ]
    for i, (label, value) in enumerate(rows):
        width = (WIDTH - 300) * value / top
        parts.append(
            f'<text x="0" y="{22 * i + 20}">{escape(label[:60])}</text>'
            f'<rect class="bar" x="240" y="{22 * i + 8}" width="{width:.1f}" height="15" fill="#4363d8">'
            f"<title>{escape(label)}: {value:g}{unit}</title></rect>"
            f'<text x="{244 + width:.1f}" y="{22 * i + 20}">{value:g}{unit}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _kpi_table(found: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{escape(name.replace('_', ' '))}</td><td>{_rate(kpi['value'])}</td><td>{kpi['numerator']}</td>"
        f"<td>{kpi['denominator']}</td><td class=muted>{escape(kpi['numerator_is'])} / "
        f"{escape(kpi['denominator_is'])}</td></tr>"
        for name, kpi in found.items()
    )
    return f"<table><tr><th>KPI</th><th>rate</th><th>numerator</th><th>denominator</th><th>of</th></tr>{rows}</table>"


def _series_table(buckets: Sequence[dict[str, Any]], granularity: str) -> str:
    rows = []
    for bucket in buckets:
        have, found = kpis.quantities(bucket["counts"]), bucket["kpis"]
        rows.append(
            f"<tr><td>{escape(_when(bucket['start'], granularity))}</td><td>{have['sent']}</td>"
            f"<td>{have['delivered']}</td><td>{have['bounced']}</td><td>{have['opened_unique_human']}</td>"
            f"<td>{have['clicked_messages_human']}</td><td>{_rate(found['delivery_rate']['value'])}</td>"
            f"<td>{_rate(found['open_rate']['value'])}</td><td>{_rate(found['click_through_rate']['value'])}</td></tr>"
        )
    return (
        "<table><tr><th>from</th><th>sent</th><th>delivered</th><th>bounced</th><th>opened</th><th>clicked</th>"
        "<th>delivery</th><th>open</th><th>click-through</th></tr>" + "".join(rows) + "</table>"
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
        f"<body>\n{body}\n</body></html>\n"
    )


def campaign_html(report: dict[str, Any], *, generated_at: datetime) -> str:
    """The page of trends.campaign_report's data."""
    campaign, granularity = report["campaign"], report["granularity"]
    title = f"Campaign {campaign['name']}"
    domain_rows = "".join(
        f"<tr><td>{escape(row['domain'])}</td><td>{row['messages']}</td><td>{row['sent']}</td><td>{row['failed']}</td>"
        f"<td>{row['bounced']}</td><td>{row['deferred']}</td><td>{_rate(row['delivery_rate'])}</td>"
        f"<td>{_rate(row['bounce_rate'])}</td></tr>"
        for row in report["domains"]
    )
    links = report["top_links"]
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">state {escape(campaign["state"])} · generated {generated_at:%Y-%m-%d %H:%M} UTC · '
        "rates from the hourly and daily roll-ups</p>",
        "<h2>KPIs</h2>",
        _kpi_table(report["kpis"]),
        f"<h2>Over time (by the {granularity})</h2>",
        trend_svg(report["series"], granularity),
        "<h2>Delivery by recipient domain</h2>",
        '<p class="muted">From the campaign\'s messages as they stand; bounced: hard bounces.</p>',
        "<table><tr><th>domain</th><th>messages</th><th>sent</th><th>failed</th><th>bounced</th><th>deferred</th>"
        f"<th>delivery</th><th>bounce</th></tr>{domain_rows}</table>"
        if domain_rows
        else "<p>No messages.</p>",
        "<h2>Top links</h2>",
        bars_svg([(link["url"], link["clicks"]) for link in links])
        + "<table><tr><th>link</th><th>clicks</th><th>unique</th></tr>"
        + "".join(f"<tr><td>{escape(k['url'])}</td><td>{k['clicks']}</td><td>{k['unique']}</td></tr>" for k in links)
        + "</table>"
        if links
        else "<p>No clicks.</p>",
    ]
    return _page(title, "\n".join(body))


def trends_html(report: dict[str, Any], *, generated_at: datetime) -> str:
    """The page of trends.trends_report's data."""
    granularity, campaign = report["granularity"], report["campaign"]
    title = "Trends" + (f": campaign {campaign['name']}" if campaign else ": all mail")
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">{_when(report["since"], granularity)} to {_when(report["until"], granularity)} '
        f"by the {granularity} · generated {generated_at:%Y-%m-%d %H:%M} UTC</p>",
        "<h2>KPIs over the period</h2>",
        _kpi_table(report["kpis"]),
        "<h2>Over time</h2>",
        trend_svg(report["series"], granularity),
        _series_table(report["series"], granularity),
    ]
    return _page(title, "\n".join(body))
