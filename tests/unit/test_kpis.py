"""KPIs from rolled-up counters, and events into counters: zero denominators, machines left out, unique vs total."""

from __future__ import annotations

from datetime import datetime

import pytest

from smartmail.analytics import rollups
from smartmail.analytics.kpis import kpis_of, period_kpis
from smartmail.errors import InvalidInput
from smartmail.workers.outcomes import RetrySchedule
from smartmail.workers.policy import DEFAULT_POLICY_FILE, load_policy

EXAMPLE = [("domain", "example.org")]


def _event(event_type: str, message: str = "m1", *, machine: bool = False, **properties) -> dict:
    return {
        "type": event_type,
        "message_id": message,
        "campaign_id": 7,
        "machine": machine,
        "properties": properties,
        "occurred_at": "2026-11-20T10:42:00Z",
        "email": None,
    }


def _totals(events: list[dict], clicked_before: set[str] | None = None) -> dict[str, int]:
    counts = rollups.count(events, {"m1": EXAMPLE, "m2": EXAMPLE}, clicked_before or set())
    return {
        metric: n
        for (dimension, _, granularity, _, metric), n in counts.items()
        if (dimension, granularity) == ("all", "day")
    }


def test_every_rate_is_none_with_a_zero_denominator():
    kpis = kpis_of({})
    assert {name: kpi["value"] for name, kpi in kpis.items()} == dict.fromkeys(kpis)
    assert all(kpi["denominator"] == 0 and kpi["numerator"] == 0 for kpi in kpis.values())
    # Opens without a delivered message still have no open rate, and no clicks no click-to-open.
    assert kpis_of({"opened_unique_human": 3})["open_rate"]["value"] is None
    assert kpis_of({"sent": 4})["click_to_open_rate"]["value"] is None


def test_rates_state_their_numerator_and_denominator():
    counts = {
        "sent": 100,
        "failed": 25,
        "bounced_hard": 10,
        "bounced_soft": 5,
        "opened_unique_human": 45,
        "opened_human": 90,
        "clicked_messages_human": 9,
        "clicked_human": 30,
        "unsubscribed": 3,
        "complained": 1,
    }
    kpis = kpis_of(counts)
    assert (kpis["delivery_rate"]["numerator"], kpis["delivery_rate"]["denominator"]) == (90, 125)
    assert kpis["bounce_rate"]["value"] == pytest.approx(15 / 100)
    assert kpis["open_rate"]["value"] == pytest.approx(45 / 90)  # unique human opens, not the 90 total
    assert kpis["click_through_rate"]["value"] == pytest.approx(9 / 90)
    assert kpis["click_to_open_rate"]["value"] == pytest.approx(9 / 45)
    assert kpis["unsubscribe_rate"]["value"] == pytest.approx(3 / 90)
    assert kpis["complaint_rate"]["value"] == pytest.approx(1 / 90)
    assert kpis["open_rate"]["numerator_is"].startswith("opened_unique_human:")
    assert kpis["open_rate"]["denominator_is"].startswith("delivered:")


def test_machine_opens_and_clicks_are_counted_apart_and_never_unique():
    totals = _totals(
        [
            _event("sent"),
            _event("opened", machine=True, unique=True),  # a privacy proxy's first fetch
            _event("clicked", machine=True, unique=True, link=1),  # a link scanner
            _event("opened", unique=True),
        ]
    )
    assert totals == {
        "sent": 1,
        "opened_machine": 1,
        "clicked_machine": 1,
        "opened_human": 1,
        "opened_unique_human": 1,
    }
    assert kpis_of({"sent": 1, "opened_machine": 1})["open_rate"]["value"] == 0


def test_unique_and_total_opens_and_clicks():
    totals = _totals(
        [
            _event("opened", unique=True),
            _event("opened", unique=False),
            _event("clicked", unique=True, link=1),
            _event("clicked", unique=True, link=2),  # another link's first click: a unique click, the same clicker
            _event("clicked", unique=False, link=1),
            _event("clicked", "m2", unique=True, link=1),  # clicked in an earlier page already
        ],
        clicked_before={"m2"},
    )
    assert totals["opened_human"] == 2 and totals["opened_unique_human"] == 1
    assert totals["clicked_human"] == 4 and totals["clicked_unique_human"] == 3
    assert totals["clicked_messages_human"] == 1


def test_bounces_by_kind_and_buckets_by_occurred_at():
    counts = rollups.count(
        [_event("bounced", kind="hard"), _event("bounced", kind="soft"), _event("order_placed", total=3)],
        {"m1": EXAMPLE},
        set(),
    )
    assert counts[("campaign", "7", "hour", datetime(2026, 11, 20, 10), "bounced_hard")] == 1
    assert counts[("domain", "example.org", "day", datetime(2026, 11, 20), "bounced_soft")] == 1
    assert not any(key[4] == "order_placed" for key in counts)


def test_a_message_counts_under_each_of_its_values_and_a_click_under_its_link():
    values = rollups.message_values(
        recipient="a@GMail.com",
        template_name="welcome",
        tags=["promo", "news", "promo"],
        campaign_id=7,
        variant="B",
        steps=["3/intro"],
        policy=load_policy(DEFAULT_POLICY_FILE, RetrySchedule()),
    )
    assert values == [
        ("domain", "gmail.com"),
        ("site", "google"),  # the shipped policy's site for gmail.com
        ("template", "welcome"),
        ("tag", "news"),
        ("tag", "promo"),
        ("variant", "7/B"),
        ("workflow_step", "3/intro"),
    ]
    counts = rollups.count(
        [_event("clicked", unique=True, link=2, url="https://shop.example/x"), _event("clicked", machine=True, link=1)],
        {"m1": values},
        set(),
    )
    day = datetime(2026, 11, 20)
    assert counts[("tag", "news", "day", day, "clicked_messages_human")] == 1
    assert counts[("tag", "promo", "day", day, "clicked_human")] == 1
    assert counts[("link", "7/https://shop.example/x", "day", day, "clicked_unique_human")] == 1
    assert counts[("link", "7/#1", "hour", datetime(2026, 11, 20, 10), "clicked_machine")] == 1
    assert not any(key[0] == "link" and key[4] == "clicked_messages_human" for key in counts)


def test_a_goal_event_counts_for_the_message_it_is_attributed_to():
    order = {**_event("order_placed", "m9", amount="12.345"), "id": 5, "campaign_id": None}
    again = {**_event("order_placed", "m9", amount=3), "id": 6, "campaign_id": None}
    counts = rollups.count(
        [order, again],
        {"m1": [("template", "welcome")]},
        set(),
        attributions={5: rollups.Attribution("m1", 7, True), 6: rollups.Attribution("m1", 7, False)},
    )
    day = datetime(2026, 11, 20)
    assert counts[("campaign", "7", "day", day, "converted")] == 1  # once per message
    assert counts[("template", "welcome", "day", day, "revenue_cents")] == 1234 + 300
    assert not any(key[4] == "order_placed" for key in counts)


@pytest.mark.parametrize(
    ("amount", "cents"),
    [(12, 1200), (12.5, 1250), ("0.015", 2), (True, 0), ("ten", 0), (None, 0), ("NaN", 0), ([1], 0), (-4, -400)],
)
def test_amounts_in_cents(amount, cents):
    assert rollups.cents_of(amount) == cents


def test_conversion_rate_and_revenue():
    kpis = kpis_of({"sent": 10, "bounced_hard": 2, "converted": 2, "revenue_cents": 999})
    assert (kpis["conversion_rate"]["numerator"], kpis["conversion_rate"]["denominator"]) == (2, 8)
    assert kpis_of({"converted": 1})["conversion_rate"]["value"] is None


@pytest.mark.parametrize(
    ("since", "until", "granularity", "dimension", "field"),
    [
        (datetime(2026, 1, 1), datetime(2026, 1, 2), "week", "all", "granularity"),
        (datetime(2026, 1, 1), datetime(2026, 1, 2), "day", "colour", "dimension"),
        (datetime(2026, 1, 2), datetime(2026, 1, 2), "day", "all", "until"),
        (datetime(2020, 1, 1), datetime(2026, 1, 2), "hour", "all", "since"),
    ],
)
def test_a_period_is_checked(since, until, granularity, dimension, field):
    with pytest.raises(InvalidInput) as raised:
        period_kpis(since, until, granularity, dimension)
    assert raised.value.field == field
