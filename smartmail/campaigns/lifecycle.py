"""Campaigns: create, schedule, launch, pause, resume and cancel; run what is due; report progress."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import exists, func, select, update

from smartmail.addresses import AddressError, parse_mailbox
from smartmail.audience.contacts import InvalidInput, NotFound
from smartmail.campaigns.fan_out import (
    audience_query,
    fan_out,
    hand_fan_out,
    known_zone,
    take_lost_fan_outs,
)
from smartmail.config import get_settings
from smartmail.content import rendering, template_store
from smartmail.store.engine import reader, session_scope, utcnow
from smartmail.store.models import (
    Campaign,
    CampaignState,
    ContactList,
    Message,
    MessageState,
    Segment,
)
from smartmail.workers.campaign_rows import window_opens
from smartmail.workers.dispatch import publish

log = structlog.get_logger("smartmail.campaigns")

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_OPEN = (
    MessageState.QUEUED.value,
    MessageState.SENDING.value,
    MessageState.DEFERRED.value,
    MessageState.SCHEDULED.value,
)


# --- Send windows ------------------------------------------------------------------------------


def parse_window(value: str | None, *, field: str = "window") -> tuple[str, str] | None:
    """`"08:00-20:00"` → ("08:00", "20:00"); a window may wrap midnight ("22:00-06:00")."""
    if value is None:
        return None
    match = _WINDOW.match(value) if isinstance(value, str) else None
    if not match or value[:5] == value[6:]:
        raise InvalidInput('expected "HH:MM-HH:MM" in 24-hour time, start and end different', field=field)
    return value[:5], value[6:]


# --- The API -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignStatus:
    name: str
    state: str
    counts: dict[str, int]
    total: int
    rate: float  # messages sent per second over the last minute
    eta_seconds: float | None
    fanned_out: bool


def _get(session, name: str) -> Campaign:
    campaign = session.scalar(select(Campaign).where(Campaign.name == name))
    if campaign is None:
        raise NotFound(f"no campaign named {name!r}")
    return campaign


def create_campaign(
    name: str,
    *,
    template: str,
    lists: Iterable[str] = (),
    segment: str | None = None,
    from_: str | None = None,
    reply_to: str | None = None,
    send_at: datetime | None = None,
    window: str | None = None,
    window_timezone: str = "UTC",
    rate_cap: float | None = None,
    tags: Iterable[str] = (),
    resend_unknown: bool = False,
) -> dict[str, Any]:
    """A draft campaign: `template` to the members of `lists` and/or the saved `segment`, minus
    suppressed and non-subscribed contacts. Errors name the field; nothing is stored then.
    `resend_unknown`: at-least-once, messages a worker crash left `unknown` (their content may
    have reached the relay) are sent again; a recipient may then get a duplicate."""
    settings = get_settings()
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidInput("a name of 1-200 characters is required", field="name")
    lists = list(lists)
    if not lists and not segment:
        raise InvalidInput("give lists, a segment, or both", field="audience")
    try:
        sender = str(parse_mailbox(from_ or settings.default_sender, field="from_"))
        reply = str(parse_mailbox(reply_to, field="reply_to")) if reply_to else None
    except AddressError as exc:
        raise InvalidInput(exc.reason, field=exc.field) from None
    start_end = parse_window(window)
    if known_zone(window_timezone, "") != window_timezone:
        raise InvalidInput(f"unknown time zone {window_timezone!r}", field="window_timezone")
    if rate_cap is not None and (isinstance(rate_cap, bool) or not isinstance(rate_cap, (int, float)) or rate_cap <= 0):
        raise InvalidInput("must be a positive number of messages per second", field="rate_cap")
    if not isinstance(resend_unknown, bool):
        raise InvalidInput("must be true or false", field="resend_unknown")
    if send_at is not None and send_at.tzinfo is not None:
        send_at = send_at.astimezone(UTC).replace(tzinfo=None)
    with session_scope() as session:
        try:
            template_store.resolve(session, template, settings.templates_dir)
        except (template_store.TemplateNotFound, ValueError) as exc:
            raise InvalidInput(str(exc), field="template") from None
        for i, list_name in enumerate(lists):
            if session.scalar(select(ContactList.id).where(ContactList.name == list_name)) is None:
                raise InvalidInput(f"no list named {list_name!r}", field=f"lists[{i}]")
        if segment and session.scalar(select(Segment.id).where(Segment.name == segment)) is None:
            raise InvalidInput(f"no saved segment named {segment!r}", field="segment")
        if session.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
            raise InvalidInput(f"a campaign named {name!r} exists already", field="name")
        campaign = Campaign(
            name=name,
            state=CampaignState.DRAFT.value,
            template_name=template,
            lists=lists,
            segment=segment,
            sender=sender,
            reply_to=reply,
            send_at=send_at,
            tags=list(tags),
            window_start=start_end[0] if start_end else None,
            window_end=start_end[1] if start_end else None,
            window_timezone=window_timezone,
            rate_cap=rate_cap,
            resend_unknown=resend_unknown,
            cursor=0,
            fanned_out=False,
        )
        session.add(campaign)
        session.flush()
        if send_at is not None:
            campaign.state = CampaignState.SCHEDULED.value
        return {"id": campaign.id, "name": name, "state": campaign.state}


def schedule_campaign(name: str, send_at: datetime) -> None:
    """Start the campaign at `send_at` (beat starts it); a draft or scheduled campaign only."""
    if send_at.tzinfo is not None:
        send_at = send_at.astimezone(UTC).replace(tzinfo=None)
    _transition(name, {CampaignState.DRAFT, CampaignState.SCHEDULED}, CampaignState.SCHEDULED, send_at=send_at)


def launch_campaign(name: str) -> None:
    """Start now: freeze the template and fan out on the bulk queue."""
    with session_scope() as session:
        campaign = _get(session, name)
        if not _start(session, campaign):
            raise InvalidInput(
                f"campaign {name!r} is {campaign.state}; only a draft or scheduled one can launch", field="state"
            )
        campaign_id, owner = campaign.id, campaign.fan_out_owner
    _publish_fan_out(campaign_id, owner)


def pause_campaign(name: str) -> None:
    """Workers stop claiming its messages at once; the rest stay queued until resumed."""
    _transition(name, {CampaignState.SENDING}, CampaignState.PAUSED)


def resume_campaign(name: str) -> None:
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state != CampaignState.PAUSED.value:
            raise InvalidInput(f"campaign {name!r} is {campaign.state}, not paused", field="state")
        campaign.state = CampaignState.SENDING.value
        owner = hand_fan_out(campaign, utcnow())
        campaign_id = campaign.id
    _publish_fan_out(campaign_id, owner)  # finishes the fan-out if unfinished, and re-dispatches what waits


def cancel_campaign(name: str) -> int:
    """Nothing more is sent; messages not yet sent become `cancelled`. Returns how many."""
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state in (CampaignState.SENT.value, CampaignState.CANCELLED.value):
            raise InvalidInput(f"campaign {name!r} is {campaign.state} already", field="state")
        campaign.state = CampaignState.CANCELLED.value
        campaign.finished_at = utcnow()
        session.flush()  # the campaign's row first, then its messages: the order delivery's recording keeps
        result = session.execute(
            update(Message)
            .where(
                Message.campaign_id == campaign.id,
                Message.state.in_(
                    [MessageState.QUEUED.value, MessageState.DEFERRED.value, MessageState.SCHEDULED.value]
                ),
            )
            .values(state=MessageState.CANCELLED.value, finished_at=utcnow(), reason="campaign cancelled"),
            execution_options={"synchronize_session": False},
        )
        return result.rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult


def _transition(name: str, sources: set[CampaignState], target: CampaignState, **values) -> None:
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state not in {s.value for s in sources}:
            raise InvalidInput(f"campaign {name!r} is {campaign.state}; cannot go to {target.value}", field="state")
        campaign.state = target.value
        for key, value in values.items():
            setattr(campaign, key, value)


def _start(session, campaign: Campaign, now: datetime | None = None) -> bool:
    """draft/scheduled → sending, with the template frozen; False if it was not startable."""
    if campaign.state not in (CampaignState.DRAFT.value, CampaignState.SCHEDULED.value):
        return False
    settings = get_settings()
    ref = template_store.resolve(session, campaign.template_name, settings.templates_dir)
    if ref.version is not None:
        parts = {
            part: template_store.load_part(None, ref.name, ref.version, part, session=session)
            for part in ("subject", "html", "text")
        }
    else:
        assert ref.path is not None  # a reference without a version is a file template
        parts = {
            part: (ref.path / filename).read_text(encoding="utf-8") if (ref.path / filename).is_file() else None
            for part, filename in template_store.FILE_PARTS.items()
        }
    campaign.subject, campaign.html, campaign.text = parts["subject"], parts["html"], parts["text"]
    if campaign.text is None and campaign.html:
        campaign.text = rendering.text_source_from_html(campaign.html)
    campaign.template_version = ref.version
    campaign.state = CampaignState.SENDING.value
    campaign.launched_at = now or utcnow()
    hand_fan_out(campaign, campaign.launched_at)
    return True


def _publish_fan_out(campaign_id: int, owner: str | None) -> None:
    publish("smartmail.campaign.fan_out", campaign_id, owner)


def campaign_status(name: str) -> CampaignStatus:
    with reader() as connection:
        campaign = connection.execute(
            select(Campaign.id, Campaign.state, Campaign.fanned_out).where(Campaign.name == name)
        ).first()
        if campaign is None:
            raise NotFound(f"no campaign named {name!r}")
        counts = dict(
            connection.execute(
                select(Message.state, func.count()).where(Message.campaign_id == campaign.id).group_by(Message.state)
            ).all()
        )
        minute_ago = utcnow() - timedelta(seconds=60)
        recent = connection.scalar(
            select(func.count()).where(
                Message.campaign_id == campaign.id,
                Message.state == MessageState.SENT.value,
                Message.finished_at >= minute_ago,
            )
        )
    remaining = sum(counts.get(s, 0) for s in _OPEN)
    rate = (recent or 0) / 60.0
    return CampaignStatus(
        name,
        campaign.state,
        counts,
        sum(counts.values()),
        rate,
        remaining / rate if rate > 0 else None,
        bool(campaign.fanned_out),
    )


def run_due(now: datetime | None = None) -> None:
    """Start scheduled campaigns whose time has come, restart fan-outs whose lease ran out, and
    mark finished campaigns sent."""
    now = now or utcnow()
    with session_scope() as session:
        due = session.scalars(
            select(Campaign).where(Campaign.state == CampaignState.SCHEDULED.value, Campaign.send_at <= now)
        ).all()
        started = [(c.id, c.fan_out_owner) for c in due if _start(session, c, now)]
    for campaign_id, owner in started:
        log.info("campaign.started", campaign_id=campaign_id)
        _publish_fan_out(campaign_id, owner)
    for campaign_id, name, owner in take_lost_fan_outs(now):
        log.warning("campaign.fan_out_restarted", campaign=name)
        _publish_fan_out(campaign_id, owner)
    open_messages = exists().where(Message.campaign_id == Campaign.id, Message.state.in_(_OPEN))
    with session_scope() as session:
        session.execute(
            update(Campaign)
            .where(Campaign.state == CampaignState.SENDING.value, Campaign.fanned_out, ~open_messages)
            .values(state=CampaignState.SENT.value, finished_at=now),
            execution_options={"synchronize_session": False},
        )


__all__ = [
    "CampaignStatus",
    "audience_query",
    "campaign_status",
    "cancel_campaign",
    "create_campaign",
    "fan_out",
    "launch_campaign",
    "parse_window",
    "pause_campaign",
    "resume_campaign",
    "run_due",
    "schedule_campaign",
    "window_opens",
]
