"""Bounce, complaint and mailto-unsubscribe effects on a real database (SQLite and PostgreSQL):
message state, suppressions, contact status, events, campaign counters, the auto-pause, replays."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from smartmail.campaigns import feedback_guard
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content.unsubscribe_links import make_token
from smartmail.feedback import effects
from smartmail.feedback.findings import Finding, Kind
from smartmail.store.engine import session_scope
from smartmail.store.models import (
    Campaign,
    CampaignState,
    Contact,
    Event,
    EventType,
    Message,
    MessageState,
    Suppression,
)
from tests.conftest import reset_caches
from tests.integration.conftest import sent_message

pytestmark = pytest.mark.integration


def _campaign(name: str = "spring", state: str = CampaignState.SENDING.value) -> int:
    with session_scope() as session:
        campaign = Campaign(name=name, state=state, template_name="welcome", sender="news@example.com", lists=[])
        session.add(campaign)
        session.flush()
        return campaign.id


def _message(email: str, state: MessageState = MessageState.SENT, campaign_id: int | None = None) -> str:
    return sent_message(email, state=state.value, campaign_id=campaign_id)


def _state(message_id: str) -> str:
    with session_scope() as session:
        return session.get(Message, message_id).state


def _contact(email: str) -> str:
    with session_scope() as session:
        return session.scalar(select(Contact.status).where(Contact.email == email))


def _suppression(email: str) -> tuple[str, str | None] | None:
    with session_scope() as session:
        row = session.get(Suppression, email)
        return (row.reason, row.source_message_id) if row else None


def _events(type_: str) -> list[Event]:
    with session_scope() as session:
        rows = list(session.scalars(select(Event).where(Event.type == type_).order_by(Event.id)))
        session.expunge_all()
        return rows


def _counters(campaign_id: int) -> tuple[int, int, int]:
    with session_scope() as session:
        c = session.get(Campaign, campaign_id)
        return c.hard_bounces, c.soft_bounces, c.complaints


def test_a_hard_bounce_bounces_the_message_suppresses_the_address_and_counts_once(env):
    campaign_id = _campaign()
    message_id = _message("gone@example.org", campaign_id=campaign_id)
    finding = Finding(Kind.HARD_BOUNCE, "dsn", recipient="gone@example.org", message_id=message_id, status="5.1.1")

    applied = effects.apply([finding], origin="inbound-1")
    assert applied.counts == {"hard_bounce": 1}
    assert applied.campaign_ids == {campaign_id}
    assert _state(message_id) == "bounced"
    assert _suppression("gone@example.org") == ("hard_bounce", message_id)
    assert _contact("gone@example.org") == "bounced"
    (event,) = _events(EventType.BOUNCED.value)
    assert (event.message_id, event.campaign_id) == (message_id, campaign_id)
    assert event.properties["kind"] == "hard" and event.properties["status"] == "5.1.1"
    assert _counters(campaign_id) == (1, 0, 0)

    # The same DSN again (a replay, or another copy through another relay): nothing changes.
    again = effects.apply([finding], origin="inbound-2")
    assert again.counts == {"duplicate": 1} and not again.campaign_ids
    assert len(_events(EventType.BOUNCED.value)) == 1
    assert _counters(campaign_id) == (1, 0, 0)


def test_the_message_decides_the_address_not_the_reports_final_recipient(env):
    # A forwarded mailbox bounces under its new name; the address we mailed is the one suppressed.
    message_id = _message("alias@example.org")
    effects.apply(
        [Finding(Kind.HARD_BOUNCE, "dsn", recipient="real@elsewhere.example", message_id=message_id)], origin="x"
    )
    assert _suppression("alias@example.org") is not None
    assert _suppression("real@elsewhere.example") is None


@pytest.mark.parametrize(
    "state, after",
    [("unknown", "bounced"), ("failed", "failed"), ("queued", "queued")],
    ids=["unknown", "failed", "queued"],
)
def test_only_a_message_that_left_becomes_bounced(env, state, after):
    message_id = _message("x@example.org", MessageState(state))
    effects.apply([Finding(Kind.HARD_BOUNCE, "dsn", message_id=message_id)], origin="x")
    assert _state(message_id) == after
    assert _suppression("x@example.org") is not None  # the address is dead whatever the message's state


def test_soft_bounces_suppress_at_the_limit_within_the_window(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SOFT_BOUNCE_LIMIT", "2")
    reset_caches()
    campaign_id = _campaign()
    first = _message("full@example.org", campaign_id=campaign_id)
    soft = Finding(Kind.SOFT_BOUNCE, "dsn", message_id=first, status="4.2.2")
    effects.apply([soft], origin="a")
    effects.apply([soft], origin="b")  # the same message's soft bounce again: one
    assert _suppression("full@example.org") is None
    assert _contact("full@example.org") == "subscribed"
    assert _state(first) == "sent"  # a soft bounce leaves the message as it was

    second_campaign = _campaign("summer")
    second = _message("full@example.org", campaign_id=second_campaign)
    effects.apply([Finding(Kind.SOFT_BOUNCE, "dsn", message_id=second, status="5.2.2")], origin="c")
    assert _suppression("full@example.org") == ("soft_bounce", second)
    assert _contact("full@example.org") == "bounced"
    assert _counters(campaign_id) == (0, 1, 0) and _counters(second_campaign) == (0, 1, 0)


def test_a_complaint_outranks_an_unsubscribe_and_counts_on_its_campaign(env):
    campaign_id = _campaign()
    message_id = _message("angry@example.org", campaign_id=campaign_id)
    with session_scope() as session:
        session.scalar(select(Contact).where(Contact.email == "angry@example.org")).status = "unsubscribed"
    effects.apply([Finding(Kind.COMPLAINT, "arf", message_id=message_id, feedback_type="abuse")], origin="r")
    assert _contact("angry@example.org") == "complained"
    assert _suppression("angry@example.org") == ("complaint", message_id)
    (event,) = _events(EventType.COMPLAINED.value)
    assert event.properties["feedback_type"] == "abuse"
    assert _counters(campaign_id) == (0, 0, 1)


def test_a_report_without_a_known_message_acts_on_the_address_once_per_report(env):
    _message("old@example.org")  # a transactional message: its contact exists
    finding = Finding(Kind.HARD_BOUNCE, "heuristic", recipient="OLD@example.org")
    assert effects.apply([finding], origin="mail-1").counts == {"hard_bounce": 1}
    assert effects.apply([finding], origin="mail-1").counts == {"duplicate": 1}
    assert _suppression("old@example.org") == ("hard_bounce", None)
    assert _contact("old@example.org") == "bounced"
    (event,) = _events(EventType.BOUNCED.value)
    assert event.message_id is None and event.contact_id is not None
    nobody = effects.apply([Finding(Kind.HARD_BOUNCE, "heuristic")], origin="mail-2")
    assert nobody.counts == {"no_recipient": 1}


def test_a_mailto_unsubscribe_is_the_one_click_unsubscribe(env):
    campaign_id = _campaign()
    _message("leaving@example.org", campaign_id=campaign_id)
    with session_scope() as session:
        contact_id = session.scalar(select(Contact.id).where(Contact.email == "leaving@example.org"))
    token = make_token(contact_id, campaign_id)
    applied = effects.apply([Finding(Kind.UNSUBSCRIBE, "mailto", unsubscribe_token=token)], origin="m1")
    assert applied.counts == {"unsubscribe": 1}
    assert _contact("leaving@example.org") == "unsubscribed"
    assert _suppression("leaving@example.org") == ("unsubscribed", None)
    (event,) = _events(EventType.UNSUBSCRIBED.value)
    assert event.properties == {"campaign_id": campaign_id, "source": "mailto"}
    forged = effects.apply([Finding(Kind.UNSUBSCRIBE, "mailto", unsubscribe_token=token[:-2] + "AA")], origin="m2")
    assert forged.counts == {"bad_token": 1}


def test_a_campaign_pauses_itself_when_its_complaint_rate_passes_the_threshold(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_MIN_DELIVERED", "10")
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_COMPLAINT_RATE", "0.1")
    reset_caches()
    campaign_id = _campaign()
    ids = [_message(f"p{i}@example.org", campaign_id=campaign_id) for i in range(20)]

    effects.apply([Finding(Kind.COMPLAINT, "arf", message_id=ids[0])], origin="1")
    effects.apply([Finding(Kind.COMPLAINT, "arf", message_id=ids[1])], origin="2")
    assert feedback_guard.pause_if_unhealthy({campaign_id}) == []  # 2 of 20 is 10%: not above
    applied = effects.apply([Finding(Kind.COMPLAINT, "arf", message_id=ids[2])], origin="3")
    assert feedback_guard.pause_if_unhealthy(applied.campaign_ids) == ["spring"]

    shown = campaigns.get_campaign("spring")
    assert shown["state"] == "paused" and shown["complaints"] == 3
    assert shown["paused_reason"] == "complaint rate 15.00% (3 of 20 delivered) passed 10.00%"
    (event,) = _events(EventType.CAMPAIGN_PAUSED.value)
    assert event.campaign_id == campaign_id and event.properties["measure"] == "complaint rate"

    # An operator's resume stands: the campaign does not pause itself again.
    with session_scope() as session:
        session.get(Campaign, campaign_id).state = CampaignState.SENDING.value
    effects.apply([Finding(Kind.COMPLAINT, "arf", message_id=ids[3])], origin="4")
    assert feedback_guard.pause_if_unhealthy({campaign_id}) == []


def test_the_bounce_rate_pauses_only_after_enough_deliveries(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_MIN_DELIVERED", "30")
    reset_caches()
    campaign_id = _campaign()
    ids = [_message(f"b{i}@example.org", campaign_id=campaign_id) for i in range(20)]
    applied = effects.apply([Finding(Kind.HARD_BOUNCE, "dsn", message_id=i) for i in ids[:5]], origin="batch")
    assert applied.counts == {"hard_bounce": 5}
    assert feedback_guard.pause_if_unhealthy(applied.campaign_ids) == []  # 25%, but only 20 delivered
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Suppression)) == 5


def test_a_report_naming_several_strangers_or_unknown_addresses_changes_nothing(env):
    _message("known@example.org")
    _message("also-known@example.org")
    forged = [Finding(Kind.HARD_BOUNCE, "dsn", recipient=e) for e in ("known@example.org", "also-known@example.org")]
    assert effects.apply(forged, origin="forged-1").counts == {"unverified": 2}
    stranger = effects.apply([Finding(Kind.COMPLAINT, "arf", recipient="nobody@example.net")], origin="arf-1")
    assert stranger.counts == {"unverified": 1}
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Suppression)) == 0
    assert _contact("known@example.org") == "subscribed"


def test_the_same_report_relayed_twice_counts_once_without_a_message(env):
    _message("twice@example.org")
    finding = Finding(Kind.SOFT_BOUNCE, "heuristic", recipient="twice@example.org", reference="<dsn-1@mx.example>")
    assert effects.apply([finding], origin="inbound-a").counts == {"soft_bounce": 1}
    assert effects.apply([finding], origin="inbound-b").counts == {"duplicate": 1}


def test_policy_soft_bounces_never_suppress_and_mailbox_ones_do(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SOFT_BOUNCE_LIMIT", "2")
    reset_caches()
    blocked = [_message("blocked@example.org") for _ in range(3)]
    for message_id in blocked:
        effects.apply([Finding(Kind.SOFT_BOUNCE, "dsn", message_id=message_id, status="5.7.1")], origin="x")
    assert _suppression("blocked@example.org") is None
    assert [e.properties["about"] for e in _events(EventType.BOUNCED.value)] == ["policy"] * 3
    full = [_message("full@example.org") for _ in range(2)]
    for message_id in full:
        effects.apply([Finding(Kind.SOFT_BOUNCE, "dsn", message_id=message_id, status="4.2.2")], origin="y")
    assert _suppression("full@example.org") == ("soft_bounce", full[1])


def test_a_providers_report_of_an_earlier_event_suppresses_without_counting_on_the_campaign(env):
    campaign_id = _campaign()
    message_id = _message("listed@example.org", campaign_id=campaign_id)
    earlier = Finding(Kind.COMPLAINT, "ses", message_id=message_id, counts_for_campaign=False)
    assert effects.apply([earlier], origin="sns-1").campaign_ids == set()
    assert _counters(campaign_id) == (0, 0, 0)
    assert _suppression("listed@example.org") == ("complaint", message_id)


@pytest.mark.parametrize("address", ["x" * 300 + "@example.org", "a\x00b@example.org", "not an address"])
def test_an_address_that_is_no_address_is_skipped_not_stored(env, address):
    applied = effects.apply([Finding(Kind.HARD_BOUNCE, "heuristic", recipient=address)], origin="odd")
    assert applied.counts == {"no_recipient": 1}
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Suppression)) == 0
