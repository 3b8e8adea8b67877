"""The scheduled report: the trends page e-mailed to SMARTMAIL_REPORT_RECIPIENTS as transactional mail."""

from __future__ import annotations

from datetime import datetime, timedelta

from smartmail.analytics import report_html, trends
from smartmail.analytics.rollups import DAY, HOUR
from smartmail.config import get_settings
from smartmail.producer.sending import SendResult, send
from smartmail.store.engine import utcnow

SEND_REPORT_TASK = "smartmail.analytics.send_report"


def send_report(now: datetime | None = None) -> list[SendResult]:
    """E-mail the trends report to each recipient (none set: nothing). One report per recipient and
    interval: the idempotency key names the interval, so a tick repeated (a redelivered task, a second
    beat) sends nothing more. A daily or longer interval reports the last 30 days by the day, a
    shorter one the last 48 hours by the hour."""
    settings = get_settings()
    if not settings.report_recipients:
        return []
    now = now or utcnow()
    interval = settings.report_interval
    period = int((now - datetime(1970, 1, 1)).total_seconds() // interval)  # which interval `now` is in
    daily = interval >= 86400
    report = trends.trends_report(
        since=now - (timedelta(days=29) if daily else timedelta(hours=47)),
        until=now,
        granularity=DAY if daily else HOUR,
    )
    page = report_html.trends_html(report, generated_at=now)
    subject = f"SmartMail report, {report['since']:%Y-%m-%d} to {now:%Y-%m-%d %H:%M} UTC"
    return [
        send(
            recipient,
            subject=subject,
            html=page,
            tags=["smartmail-report"],
            idempotency_key=f"smartmail-report:{interval:g}:{period}:{recipient}",
            track=False,
        )
        for recipient in settings.report_recipients
    ]
