"""A sending campaign pauses itself when its complaint or hard-bounce rate passes the thresholds."""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from sqlalchemy import Row, func, select, update

from smartmail.config import get_settings
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import Campaign, CampaignState, Event, EventType, Message, MessageState

log = structlog.get_logger("smartmail.campaigns")

# Delivered: the relay accepted it. A bounced message was delivered to the relay first.
_DELIVERED = (MessageState.SENT.value, MessageState.BOUNCED.value)


def pause_if_unhealthy(campaign_ids: Iterable[int]) -> list[str]:
    """Pause each sending campaign whose complaints or hard bounces per delivered message passed
    SMARTMAIL_AUTO_PAUSE_COMPLAINT_RATE or SMARTMAIL_AUTO_PAUSE_BOUNCE_RATE once at least
    SMARTMAIL_AUTO_PAUSE_MIN_DELIVERED were delivered (Gmail and Yahoo's bulk-sender rules ask
    for a spam rate under 0.3%). The reason is kept on the campaign and written as a
    `campaign_paused` event. A campaign pauses itself once: after an operator resumes it, it runs on.
    The names of the campaigns paused."""
    settings = get_settings()
    paused = []
    for campaign_id in sorted(set(campaign_ids)):
        with session_scope() as session:
            campaign = session.execute(
                select(
                    Campaign.name, Campaign.state, Campaign.paused_reason, Campaign.complaints, Campaign.hard_bounces
                ).where(Campaign.id == campaign_id)
            ).first()
            if campaign is None or campaign.state != CampaignState.SENDING.value or campaign.paused_reason:
                continue
            # The rates are at most count / minimum: below the thresholds, counting the delivered is moot.
            if _breach(campaign, settings.auto_pause_min_delivered) is None:
                continue
            name = campaign.name
            delivered = session.scalar(
                select(func.count()).where(Message.campaign_id == campaign_id, Message.state.in_(_DELIVERED))
            )
            if not delivered or delivered < settings.auto_pause_min_delivered:
                continue
            breach = _breach(campaign, delivered)
            if breach is None:
                continue
            measure, count, rate, threshold = breach
            reason = f"{measure} {rate:.2%} ({count} of {delivered} delivered) passed {threshold:.2%}"
            moved = session.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id, Campaign.state == CampaignState.SENDING.value)
                .values(state=CampaignState.PAUSED.value, paused_reason=reason)
            )
            if not moved.rowcount:  # type: ignore[attr-defined]  # an UPDATE's CursorResult
                continue
            session.add(
                Event(
                    type=EventType.CAMPAIGN_PAUSED.value,
                    campaign_id=campaign_id,
                    occurred_at=utcnow(),
                    properties={"reason": reason, "measure": measure, "rate": rate, "threshold": threshold},
                )
            )
            paused.append(name)
        log.warning("campaign.auto_paused", campaign_id=campaign_id, campaign=name, reason=reason)
    return paused


def _breach(campaign: Row, delivered: int) -> tuple[str, int, float, float] | None:
    """(measure, count, rate, threshold) of the first rate over its threshold, if one is."""
    settings = get_settings()
    for measure, count, threshold in (
        ("complaint rate", campaign.complaints, settings.auto_pause_complaint_rate),
        ("hard-bounce rate", campaign.hard_bounces, settings.auto_pause_bounce_rate),
    ):
        if count / delivered > threshold:
            return measure, count, count / delivered, threshold
    return None
