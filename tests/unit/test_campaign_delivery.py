"""campaign_delivery.prepare on claimed rows: the re-check reads the contact the claim returned with each row."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

import pytest

from smartmail.workers import campaign_rows as campaign_delivery
from tests.unit.test_unsubscribe_tokens import env  # noqa: F401 - autouse: the required settings only

CAMPAIGN = SimpleNamespace(
    id=7,
    name="spring",
    subject="Hi {{ first_name }}",
    html="<p>Hi {{ first_name }}</p>",
    text="Hi {{ first_name }}",
    rate_cap=None,
    window_start=None,
    window_end=None,
    window_timezone=None,
    tracking=True,
    utm=None,
)


@pytest.fixture(autouse=True)
def campaign(monkeypatch):
    monkeypatch.setattr(campaign_delivery, "_frozen", {CAMPAIGN.id: CAMPAIGN})


def row(contact_id: int, status: str | None = "subscribed", suppressed: str | None = None, campaign_id: int | None = 7):
    """A claimed row as delivery's claim returns it (delivery._claimed_columns and _contact_columns)."""
    email = f"c{contact_id}@example.net"
    return SimpleNamespace(
        id=f"m{contact_id}",
        sender="news@example.com",
        recipient=email,
        reply_to=None,
        subject="",
        text="",
        html=None,
        headers={},
        message_id_header=f"<m{contact_id}@example.com>",
        attempts=1,
        created_at=datetime(2026, 1, 1),
        send_at=None,
        campaign_id=campaign_id,
        contact_id=contact_id,
        contact_email=None if status is None else email,
        contact_status=status,
        contact_attributes={"first_name": f"F{contact_id}"},
        contact_timezone=None,
        suppressed=suppressed,
    )


def test_each_row_is_rechecked_from_the_contact_its_claim_returned():
    transactional = row(5, status=None, campaign_id=None)
    prepared = campaign_delivery.prepare(
        [row(1), row(2, status=None), row(3, status="unsubscribed"), row(4, suppressed="hard_bounce"), transactional],
        datetime(2026, 1, 1),
    )
    assert [(r.id, reason) for r, reason in prepared.suppressed] == [
        ("m2", "contact erased"),
        ("m3", "contact unsubscribed"),
        ("m4", "recipient suppressed: hard_bounce"),
    ]
    assert [r.id for r in prepared.ready] == ["m5", "m1"] and prepared.ready[0] is transactional
    rendered = prepared.ready[1]
    assert rendered.subject == "Hi F1" and rendered.headers["X-SmartMail-Contact"] == "1"
    assert "/unsubscribe/1.7." in rendered.headers["List-Unsubscribe"]


def test_a_full_cache_of_campaigns_is_emptied_before_it_is_read(monkeypatch):
    """With more than 1,000 campaigns seen, the cache is cleared and every campaign of the window
    read again, not only those missing before the clear."""
    frozen = {i: SimpleNamespace(id=i) for i in range(1, 1002)}
    monkeypatch.setattr(campaign_delivery, "_frozen", frozen)

    class Reader:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def execute(self, _statement, parameters):
            return [SimpleNamespace(id=i, ab_frozen=None) for i in parameters["ids"]]

    monkeypatch.setattr(campaign_delivery, "reader", Reader)
    assert set(campaign_delivery._campaign_rows({5, 5000})) == {5, 5000}


def test_campaign_messages_are_tracked_unless_the_contact_opted_out():
    opted_out = row(8)
    opted_out.contact_attributes = {"first_name": "F8", "tracking_opt_out": True}
    tracked, untracked = campaign_delivery.prepare([row(1), opted_out], datetime(2026, 1, 1)).ready
    assert "/t/o/m1." in tracked.html
    assert "/t/" not in untracked.html and "/t/" not in untracked.text
    assert "/unsubscribe/" in untracked.html  # the way out, untracked either way
