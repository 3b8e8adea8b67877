"""A/B tests: the seeded split, the z-test against values worked by hand, the settings' errors naming the key."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from statistics import NormalDist
from types import SimpleNamespace

import pytest

from smartmail.campaigns import ab_tests
from smartmail.content import template_store
from smartmail.errors import InvalidInput

TWO = [{"subject": "A"}, {"subject": "B"}]


def split_of(seed: int, contacts: range, share: float, count: int) -> Counter:
    return Counter(ab_tests.place(seed, contact_id, share, count) for contact_id in contacts)


def test_the_split_is_reproducible_from_its_seed_and_even_within_sampling_noise():
    contacts = range(1, 50_001)
    first = [ab_tests.place(42, c, 0.2, 2) for c in contacts]
    assert first == [ab_tests.place(42, c, 0.2, 2) for c in contacts]  # the seed makes the split again
    assert first != [ab_tests.place(43, c, 0.2, 2) for c in contacts]  # another seed, another split
    counts = Counter(first)
    # 20% of 50,000 in the test: 10,000, binomial sd ~89; each half 5,000 (sd ~71). Four sd of slack.
    assert abs(sum(counts[v] for v in (0, 1)) - 10_000) < 4 * math.sqrt(50_000 * 0.2 * 0.8)
    for variant in (0, 1):
        assert abs(counts[variant] - 5_000) < 4 * math.sqrt(10_000 * 0.25)
    five = split_of(7, contacts, 0.5, 5)
    assert set(five) == {None, 0, 1, 2, 3, 4}
    for variant in range(5):
        assert abs(five[variant] - 5_000) < 4 * math.sqrt(25_000 * 0.2 * 0.8)


def test_a_contact_in_a_smaller_share_is_in_every_larger_one_with_the_same_seed():
    # The hash places a contact at one spot: a share of 1 takes everyone, and a smaller one a subset.
    everyone = split_of(3, range(1, 2001), 1.0, 3)
    assert None not in everyone and sum(everyone.values()) == 2000
    small = {c for c in range(1, 2001) if ab_tests.place(3, c, 0.1, 3) is not None}
    large = {c for c in range(1, 2001) if ab_tests.place(3, c, 0.3, 3) is not None}
    assert small < large


def test_split_places_test_contacts_on_their_variant_and_the_rest_on_the_winner():
    variants = [
        {"name": "A", "sender": "News <news@example.com>", "send_at": None},
        {"name": "B", "sender": "Ann <news@example.com>", "send_at": "2030-01-01T09:00:00"},
    ]
    campaign = SimpleNamespace(ab_test={"seed": 5, "test_share": 0.5}, ab_frozen=variants, ab_winner=None)
    now = datetime(2029, 12, 31)
    split = ab_tests.Split(campaign)
    placed = {c: split.place(c, now) for c in range(1, 201)}
    for contact_id, where in placed.items():
        index = ab_tests.place(5, contact_id, 0.5, 2)
        if index is None:
            assert where is None  # outside the test share: nothing until a winner exists
        else:
            assert where is not None and where.variant == where.renders == variants[index]["name"]
            assert where.sender == variants[index]["sender"]
            assert where.send_at == (datetime(2030, 1, 1, 9) if index == 1 else None)
    campaign.ab_winner = "B"
    after = ab_tests.Split(campaign).place(1, now)
    assert after == ab_tests.Placed(None, "B", "Ann <news@example.com>", None)  # the rest: the winner, unrecorded


def normal_p(z: float) -> float:
    return 2 * (1 - NormalDist().cdf(abs(z)))


def test_z_test_matches_values_worked_by_hand():
    # 200/1000 against 250/1000: pooled 0.225, se = sqrt(0.225 * 0.775 * 2/1000) = 0.0186749
    z, p = ab_tests.z_test(200, 1000, 250, 1000)
    assert z == pytest.approx(-2.67739, abs=1e-4)
    assert p == pytest.approx(0.0074194, abs=1e-6) and p == pytest.approx(normal_p(z), abs=1e-9)
    # 45/100 against 30/100: pooled 0.375, se = sqrt(0.375 * 0.625 * 0.02) = 0.0684653, z = 2.19089
    z, p = ab_tests.z_test(45, 100, 30, 100)
    assert z == pytest.approx(2.19089, abs=1e-4) and p == pytest.approx(0.028460, abs=1e-5)
    # Close rates, small groups: not significant.
    z, p = ab_tests.z_test(11, 50, 9, 50)
    assert p is not None and p > 0.05 and z == pytest.approx(0.5, abs=1e-9)
    # Equal rates: z 0, p 1; nothing to compare: none.
    assert ab_tests.z_test(10, 100, 10, 100) == (0.0, 1.0)
    assert ab_tests.z_test(0, 100, 0, 100) == (None, None)
    assert ab_tests.z_test(5, 0, 5, 10) == (None, None)


@pytest.mark.parametrize(
    ("text", "seconds"), [("4h", 14400), ("90m", 5400), ("1d12h", 129600), ("45s", 45), (3600, 3600), ("1h30m", 5400)]
)
def test_durations(text, seconds):
    assert ab_tests.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "4x", "h", 0, -5, True, "31d", None, float("nan")])
def test_bad_durations_name_the_field(bad):
    with pytest.raises(InvalidInput) as caught:
        ab_tests.parse_duration(bad)
    assert caught.value.field == "ab_test.duration"


def test_settings_get_their_defaults_and_a_kept_seed(settings_env):
    checked = ab_tests.check(None, {"variants": TWO, "test_share": "20%", "duration": "4h"})
    assert checked is not None
    assert [v["name"] for v in checked["variants"]] == ["A", "B"]
    assert (checked["test_share"], checked["metric"], checked["duration"], checked["auto_winner"]) == (
        0.2,
        "opens",
        14400,
        True,
    )
    assert isinstance(checked["seed"], int) and checked["conversion_hours"] == 24.0
    given = ab_tests.check(
        None,
        {
            "variants": [
                {"name": "short", "from_name": "Ann"},
                {"name": "long", "send_at": "2030-01-01T10:00:00+01:00"},
            ],
            "test_share": 0.1,
            "duration": 600,
            "metric": "conversions",
            "conversion_event": "order_placed",
            "conversion_hours": 48,
            "auto_winner": False,
            "seed": 9,
        },
    )
    assert given is not None and given["seed"] == 9 and given["variants"][1]["send_at"] == "2030-01-01T09:00:00"
    assert ab_tests.check(None, None) is None


def not_found(session, name, templates_dir, max_age=0.0):
    raise template_store.TemplateNotFound(f"no template named {name!r}")


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ("B", "ab_test"),
        ({"variants": TWO, "test_share": 0.2, "duration": "4h", "colour": "red"}, "ab_test.colour"),
        ({"variants": [{"subject": "only"}], "test_share": 0.2, "duration": "4h"}, "ab_test.variants"),
        ({"variants": TWO * 3, "test_share": 0.2, "duration": "4h"}, "ab_test.variants"),
        (
            {"variants": [{}, {"template": "missing"}], "test_share": 0.2, "duration": "4h"},
            "ab_test.variants[1].template",
        ),
        (
            {"variants": [{}, {"subject": "{% if %}"}], "test_share": 0.2, "duration": "4h"},
            "ab_test.variants[1].subject",
        ),
        (
            {"variants": [{}, {"subject": "a\r\nBcc: x@y.z"}], "test_share": 0.2, "duration": "4h"},
            "ab_test.variants[1].subject",
        ),
        ({"variants": [{}, {"from_name": ""}], "test_share": 0.2, "duration": "4h"}, "ab_test.variants[1].from_name"),
        ({"variants": [{}, {"send_at": "soon"}], "test_share": 0.2, "duration": "4h"}, "ab_test.variants[1].send_at"),
        ({"variants": [{}, {"name": "a b"}], "test_share": 0.2, "duration": "4h"}, "ab_test.variants[1].name"),
        ({"variants": [{"name": "X"}, {"name": "X"}], "test_share": 0.2, "duration": "4h"}, "ab_test.variants[1].name"),
        ({"variants": [{}, {"colour": 1}], "test_share": 0.2, "duration": "4h"}, "ab_test.variants[1].colour"),
        ({"variants": [{}, "B"], "test_share": 0.2, "duration": "4h"}, "ab_test.variants[1]"),
        ({"variants": TWO, "duration": "4h"}, "ab_test.test_share"),
        ({"variants": TWO, "test_share": 1.5, "duration": "4h"}, "ab_test.test_share"),
        ({"variants": TWO, "test_share": "0%", "duration": "4h"}, "ab_test.test_share"),
        ({"variants": TWO, "test_share": 0.2}, "ab_test.duration"),
        ({"variants": TWO, "test_share": 0.2, "duration": "4h", "metric": "revenue"}, "ab_test.metric"),
        ({"variants": TWO, "test_share": 0.2, "duration": "4h", "metric": "conversions"}, "ab_test.conversion_event"),
        (
            {"variants": TWO, "test_share": 0.2, "duration": "4h", "conversion_event": "opened"},
            "ab_test.conversion_event",
        ),
        ({"variants": TWO, "test_share": 0.2, "duration": "4h", "conversion_hours": 0}, "ab_test.conversion_hours"),
        ({"variants": TWO, "test_share": 0.2, "duration": "4h", "auto_winner": "yes"}, "ab_test.auto_winner"),
        ({"variants": TWO, "test_share": 0.2, "duration": "4h", "seed": -1}, "ab_test.seed"),
    ],
)
def test_bad_settings_name_the_key(settings, field, settings_env):
    settings_env.setattr(template_store, "resolve", not_found)
    with pytest.raises(InvalidInput) as caught:
        ab_tests.check(None, settings)
    assert caught.value.field == field
