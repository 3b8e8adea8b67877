"""Claimed campaign messages: the recipient re-checked, the send window and rate cap kept, the template rendered."""

from __future__ import annotations

import html as html_lib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from redis.exceptions import RedisError
from sqlalchemy import bindparam, select

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.content import rendering, tracking_links
from smartmail.content.tracking_links import TRACKING_OPT_OUT
from smartmail.content.unsubscribe_links import list_unsubscribe_headers, make_token, unsubscribe_url
from smartmail.store.engine import reader
from smartmail.store.models import VARIANT_HEADER, Campaign, ContactStatus
from smartmail.workers.limiter import get_throttle
from smartmail.workers.outcomes import RetrySchedule
from smartmail.workers.policy import Site

log = structlog.get_logger("smartmail.campaigns")

_campaign = select(
    Campaign.id,
    Campaign.name,
    Campaign.subject,
    Campaign.html,
    Campaign.text,
    Campaign.rate_cap,
    Campaign.window_start,
    Campaign.window_end,
    Campaign.window_timezone,
    Campaign.tracking,
    Campaign.utm,
    Campaign.ab_frozen,
).where(Campaign.id.in_(bindparam("ids", expanding=True)))

# Frozen at launch, so a process may keep them: campaign id -> its row; an A/B campaign's variants
# (frozen at launch too) by name.
_frozen: dict[int, Any] = {}
_variants: dict[int, dict[str, Variant]] = {}
runtime.on_reset(lambda _close: _frozen.clear())
runtime.on_reset(lambda _close: _variants.clear())


@dataclass(frozen=True)
class Variant:
    """An A/B campaign's variant's frozen content (campaigns/ab_tests.freeze)."""

    name: str
    subject: str | None
    html: str | None
    text: str | None


@dataclass
class Prepared:
    ready: list = field(default_factory=list)  # rows to send, content rendered
    suppressed: list = field(default_factory=list)  # (row, reason): not sent, never will be
    held: list = field(default_factory=list)  # (row, seconds, reason): outside the window, over the cap
    failed: list = field(default_factory=list)  # (row, reason): the template cannot render for this contact


def _campaign_rows(ids: set[int]) -> dict[int, Any]:
    """The campaigns' frozen rows (_campaign), read once per process."""
    if len(_frozen) > 1000:
        _frozen.clear()
        _variants.clear()
    missing = ids - _frozen.keys()
    if missing:
        with reader() as connection:
            _frozen.update({c.id: c for c in connection.execute(_campaign, {"ids": list(missing)})})
        for campaign_id in missing:
            if frozen := _frozen[campaign_id].ab_frozen:
                _variants[campaign_id] = {
                    v["name"]: Variant(v["name"], v["subject"], v["html"], v["text"]) for v in frozen
                }
    return {i: _frozen[i] for i in ids}


def prepare(rows: list, now: datetime) -> Prepared:
    """Split a claimed window: transactional rows pass through; each campaign row is re-checked
    (its contact still subscribed, its address not suppressed), kept to its send window and its
    campaign's rate cap, and rendered with the campaign's compiled template."""
    prepared = Prepared()
    mine = [r for r in rows if r.campaign_id is not None]
    prepared.ready = [r for r in rows if r.campaign_id is None]
    if not mine:
        return prepared
    campaigns = _campaign_rows({r.campaign_id for r in mine})
    sendable = []
    for row in mine:  # each row carries its contact (store.sql.claims._contact_columns)
        campaign = campaigns[row.campaign_id]
        if row.contact_status is None:
            prepared.suppressed.append((row, "contact erased"))
        elif row.contact_status != ContactStatus.SUBSCRIBED.value:
            prepared.suppressed.append((row, f"contact {row.contact_status}"))
        elif row.suppressed is not None:
            prepared.suppressed.append((row, f"recipient suppressed: {row.suppressed}"))
        elif campaign.window_start and (
            opens := window_opens(
                now, row.contact_timezone or campaign.window_timezone, campaign.window_start, campaign.window_end
            )
        ):
            prepared.held.append((row, (opens - now).total_seconds(), "outside the campaign's send window"))
        else:
            sendable.append((row, campaign))
    for row, campaign in _rate_capped(sendable, prepared):
        try:
            prepared.ready.append(_render(row, campaign))
        except rendering.TemplateError as exc:
            prepared.failed.append((row, f"template error: {exc}"))
    return prepared


def _rate_capped(sendable: list, prepared: Prepared):
    """Yield what each campaign's rate cap lets go now; hold the rest for their slot."""
    by_campaign: dict[int, list] = {}
    for item in sendable:
        by_campaign.setdefault(item[0].campaign_id, []).append(item)
    for campaign_id, items in by_campaign.items():
        cap = items[0][1].rate_cap
        if cap is None:
            yield from items
            continue
        # The campaign-wide cap is one more GCRA bucket, shared by every worker like a site's.
        bucket = Site(f"campaign-{campaign_id}", cap, max(1, int(cap)), 1, 1, RetrySchedule())
        try:
            grant = get_throttle().acquire(bucket, len(items))
            granted, first, spacing = grant.granted, grant.first_wait, grant.spacing
        except RedisError as exc:
            log.error("campaign.rate_cap_unavailable", campaign_id=campaign_id, error=str(exc))
            granted, first, spacing = 0, 5.0, 0.0
        yield from items[:granted]
        prepared.held += [
            (item[0], first + i * spacing, "throttled: campaign rate cap") for i, item in enumerate(items[granted:])
        ]


def window_opens(now: datetime, zone: str, start: str, end: str) -> datetime | None:
    """None when `now` (naive UTC) is inside the daily window in `zone`; else when it next opens (naive UTC)."""
    local = now.replace(tzinfo=UTC).astimezone(ZoneInfo(zone))
    s_h, s_m = map(int, start.split(":"))
    e_h, e_m = map(int, end.split(":"))
    minute = local.hour * 60 + local.minute
    s, e = s_h * 60 + s_m, e_h * 60 + e_m
    inside = s <= minute < e if s < e else (minute >= s or minute < e)
    if inside:
        return None
    opening = local.replace(hour=s_h, minute=s_m, second=0, microsecond=0)
    if opening <= local:
        opening += timedelta(days=1)
    return opening.astimezone(UTC).replace(tzinfo=None)


class Rendered:
    """A claimed row (store.sql.claims._claimed_columns) with its content rendered. The row's fields are
    copied: delegating them through __getattr__ would cost an indirection per field read."""

    __slots__ = (
        "id",
        "sender",
        "recipient",
        "reply_to",
        "message_id_header",
        "attempts",
        "created_at",
        "send_at",
        "campaign_id",
        "contact_id",
        "subject",
        "html",
        "text",
        "headers",
    )

    def __init__(self, row, subject: str, html: str | None, text: str, headers: dict[str, str]) -> None:
        self.id, self.sender, self.recipient, self.reply_to = row.id, row.sender, row.recipient, row.reply_to
        self.message_id_header, self.attempts, self.created_at, self.send_at = (
            row.message_id_header,
            row.attempts,
            row.created_at,
            row.send_at,
        )
        self.campaign_id, self.contact_id = row.campaign_id, row.contact_id
        self.subject, self.html, self.text, self.headers = subject, html, text, headers


def _content(row, campaign):
    """What the row is sent with: its campaign's frozen content, or for an A/B campaign the
    variant its headers name (the row carries it: no query per message)."""
    variants = _variants.get(campaign.id)
    if variants is None:
        return campaign
    return variants.get((row.headers or {}).get(VARIANT_HEADER)) or next(iter(variants.values()))


def _render(row, campaign) -> Rendered:
    content = _content(row, campaign)
    token = make_token(row.contact_id, campaign.id)
    url = unsubscribe_url(token)
    context = {
        **(row.contact_attributes or {}),
        "email": row.contact_email,
        "unsubscribe_url": url,
        "campaign": campaign.name,
    }
    rendered = rendering.render(None, context=context, subject=content.subject, html=content.html, text=content.text)
    html, text = rendered.html, rendered.text
    # Every marketing message shows a way out, whether or not the template placed the link.
    if "unsubscribe_url" not in (content.html or "") and html is not None:
        footer = f'<p style="font-size:12px;color:#666"><a href="{html_lib.escape(url)}">Unsubscribe</a></p>'
        html = html.replace("</body>", footer + "</body>") if "</body>" in html else html + footer
    if "unsubscribe_url" not in (content.text or "") and url not in text:
        text = f"{text.rstrip()}\n\nUnsubscribe: {url}\n"
    if campaign.tracking and not (row.contact_attributes or {}).get(TRACKING_OPT_OUT):
        html, text = tracking_links.track(
            html, text, message_id=row.id, skip=(url,), utm=campaign.utm, honeypot=get_settings().track_honeypot
        )
    headers = {
        **list_unsubscribe_headers(row.contact_id, campaign.id, token=token),
        "X-SmartMail-Campaign": str(campaign.id),
        "X-SmartMail-Contact": str(row.contact_id),
    }
    if content is not campaign:
        headers[VARIANT_HEADER] = content.name
    return Rendered(row, rendered.subject, html, text, headers)
