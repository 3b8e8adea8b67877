"""The engagement score's maths (decay, order independence, the key's equivalence), its segment rule and settings."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from smartmail import runtime
from smartmail.audience import segments
from smartmail.audience.engagement_score import Decay, Tally, add_keys, tally
from smartmail.audience.segments import InvalidSegment
from smartmail.config.celery import celery_config
from smartmail.config.settings import load_settings
from smartmail.errors import SettingsError

DECAY = Decay(open_points=1.0, click_points=3.0, half_life_days=14.0)
NOW = datetime(2026, 12, 4, 20, 0, 0)


def _event(kind: str, at: datetime, contact_id: int | None = 1, machine: bool = False) -> dict:
    return {
        "type": kind,
        "occurred_at": at.isoformat() + "Z",
        "contact_id": contact_id,
        "machine": machine,
    }


def _brute(events: list[dict], now: datetime, decay: Decay = DECAY) -> dict[int, float]:
    """Σ points · 2^(-age / half-life), straight from the definition."""
    scores: dict[int, float] = {}
    for event in events:
        if event["contact_id"] is None or event["machine"]:
            continue
        at = datetime.fromisoformat(event["occurred_at"].removesuffix("Z"))
        age_days = (now - at).total_seconds() / 86400
        points = decay.points(event["type"])
        scores[event["contact_id"]] = scores.get(event["contact_id"], 0.0) + points * 0.5 ** (
            age_days / decay.half_life_days
        )
    return scores


def _random_events(rng: random.Random, count: int, contacts: int = 5) -> list[dict]:
    return [
        _event(
            rng.choice(["opened", "opened", "clicked"]),
            NOW - timedelta(seconds=rng.randrange(0, 200 * 86400)),
            rng.randrange(1, contacts + 1),
        )
        for _ in range(count)
    ]


def test_an_open_halves_every_half_life():
    at = NOW - timedelta(days=30)
    key = DECAY.key(1.0, at)
    assert DECAY.score(key, at) == pytest.approx(1.0, rel=1e-12)
    assert DECAY.score(key, at + timedelta(days=14)) == pytest.approx(0.5, rel=1e-12)
    assert DECAY.score(key, at + timedelta(days=28)) == pytest.approx(0.25, rel=1e-12)
    assert DECAY.decayed(1.0, at, at + timedelta(days=7)) == pytest.approx(2**-0.5, rel=1e-12)
    assert DECAY.decayed(None, None, NOW) == 0.0


def test_a_click_is_worth_its_points_and_machines_and_other_events_nothing():
    events = [
        _event("clicked", NOW),
        _event("opened", NOW, machine=True),
        _event("sent", NOW),
        _event("opened", NOW, contact_id=None),
    ]
    totals = tally(events, DECAY)
    assert list(totals) == [1]
    assert DECAY.score(totals[1].key, NOW) == pytest.approx(3.0, rel=1e-12)
    assert tally([_event("opened", NOW)], Decay(0.0, 3.0, 14.0)) == {}  # an open worth nothing is not counted


@pytest.mark.parametrize("seed", range(5))
def test_the_sum_is_the_same_in_any_order_and_any_pages(seed):
    rng = random.Random(seed)
    events = _random_events(rng, 300)
    expected = _brute(events, NOW)
    for _ in range(4):
        rng.shuffle(events)
        # Pages of random sizes, each tallied and then added to what was stored, as the reader does.
        stored: dict[int, Tally] = {}
        start = 0
        while start < len(events):
            size = rng.randrange(1, 60)
            for contact_id, total in tally(events[start : start + size], DECAY).items():
                stored[contact_id] = stored[contact_id].plus(total) if contact_id in stored else total
            start += size
        assert stored.keys() == expected.keys()
        for contact_id, total in stored.items():
            assert total.at == max(
                datetime.fromisoformat(e["occurred_at"].removesuffix("Z"))
                for e in events
                if e["contact_id"] == contact_id
            )
            assert DECAY.score(total.key, NOW) == pytest.approx(expected[contact_id], rel=1e-9)
            # The readable pair (score as of its latest event) decays to the same number.
            readable = DECAY.score(total.key, total.at)
            assert DECAY.decayed(readable, total.at, NOW) == pytest.approx(expected[contact_id], rel=1e-9)


def test_the_key_comparison_is_the_score_comparison():
    rng = random.Random(7)
    for _ in range(2000):
        at = NOW - timedelta(days=rng.uniform(0, 400))
        score_then = rng.uniform(0.01, 500)
        key = DECAY.key(score_then, at)
        now = at + timedelta(days=rng.uniform(0, 100))
        threshold = rng.choice([rng.uniform(0.001, 600), 10 ** rng.uniform(-6, 3)])
        score_now = DECAY.score(key, now)
        if abs(score_now - threshold) <= 1e-9 * threshold:
            continue  # at the boundary rounding decides either way
        assert (score_now >= threshold) == (key >= DECAY.key(threshold, now))
        assert (score_now < threshold) == (key < DECAY.key(threshold, now))


def test_adding_keys_never_overflows():
    assert add_keys(None, 5.0) == 5.0
    assert add_keys(1000.0, -1000.0) == 1000.0
    assert add_keys(1000.0, 1000.0) == pytest.approx(1000.0 + math.log(2), abs=1e-12)
    assert add_keys(-5.0, 2000.0) == 2000.0
    # Today's keys are near 1,000 (days since 1970 over τ): exp() of one would overflow.
    assert DECAY.key(1.0, NOW) > 700


def test_the_time_an_event_is_read_does_not_matter_only_when_it_happened():
    early, late = NOW - timedelta(days=20), NOW - timedelta(days=1)
    in_order = tally([_event("opened", early), _event("clicked", late)], DECAY)[1]
    first = tally([_event("clicked", late)], DECAY)[1]
    out_of_order = first.plus(tally([_event("opened", early)], DECAY)[1])
    assert out_of_order.at == in_order.at == late
    assert out_of_order.key == pytest.approx(in_order.key, abs=1e-12)


# --- The segment rule ----------------------------------------------------------------------------

BAD_RULES = [
    ({"engagement_score": 5}, "rules.engagement_score", "must be an object"),
    ({"engagement_score": {}}, "rules.engagement_score", "must be an object"),
    ({"engagement_score": {"eq": 5}}, "rules.engagement_score.eq", "unknown operator 'eq'"),
    ({"engagement_score": {"gte": "5"}}, "rules.engagement_score.gte", "must be a number from 0"),
    ({"engagement_score": {"gte": True}}, "rules.engagement_score.gte", "must be a number from 0"),
    ({"engagement_score": {"lt": -1}}, "rules.engagement_score.lt", "must be a number from 0"),
    ({"engagement_score": {"gt": float("inf")}}, "rules.engagement_score.gt", "must be a number from 0"),
    ({"engagement_score": {"gt": 1}, "within": 3}, "rules.within", "unexpected key 'within'"),
    (
        {"all": [{"status": "subscribed"}, {"engagement_score": {"gte": None}}]},
        "rules.all[1].engagement_score.gte",
        "number",
    ),
]


@pytest.mark.parametrize(("rules", "field", "message"), BAD_RULES)
def test_bad_score_rules_name_their_path(rules, field, message):
    with pytest.raises(InvalidSegment) as caught:
        segments.parse(rules)
    assert caught.value.field == field
    assert message in str(caught.value)


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "postgresql"])
def test_a_score_rule_is_one_comparison_of_the_key(settings_env, dialect):
    rules = {"all": [{"engagement_score": {"gte": 5, "lt": 20}}, {"not": {"engagement_score": {"gt": 0}}}]}
    sql = str(segments.compile_where(rules, dialect, now=NOW).compile(dialect=dialect))
    assert "engagement_key >=" in sql and "engagement_key <" in sql
    assert "exp" not in sql.lower() and "ln(" not in sql.lower() and "power" not in sql.lower()
    compiled = segments.compile_where({"engagement_score": {"gte": 5}}, dialect, now=NOW).compile(dialect=dialect)
    (threshold,) = [v for v in compiled.params.values() if isinstance(v, float)]
    assert threshold == pytest.approx(
        math.log(5) + (NOW - datetime(1970, 1, 1)).total_seconds() / 86400 / (14 / math.log(2)), rel=1e-6
    )


def test_the_threshold_follows_the_settings(settings_env):
    settings_env.setenv("SMARTMAIL_ENGAGEMENT_HALF_LIFE_DAYS", "7")
    runtime.reset()
    compiled = segments.compile_where({"engagement_score": {"gte": 1}}, sqlite.dialect(), now=NOW).compile(
        dialect=sqlite.dialect()
    )
    (threshold,) = [v for v in compiled.params.values() if isinstance(v, float)]
    assert threshold == pytest.approx(Decay(1, 3, 7).key(1.0, NOW), rel=1e-12)


# --- Settings and the beat entry -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMARTMAIL_ENGAGEMENT_HALF_LIFE_DAYS", "0"),
        ("SMARTMAIL_ENGAGEMENT_HALF_LIFE_DAYS", "-3"),
        ("SMARTMAIL_ENGAGEMENT_OPEN_POINTS", "-1"),
        ("SMARTMAIL_ENGAGEMENT_CLICK_POINTS", "many"),
        ("SMARTMAIL_ENGAGEMENT_INTERVAL", "0"),
    ],
)
def test_bad_engagement_settings_are_refused_by_name(settings_env, name, value):
    settings_env.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_defaults_and_the_beat_entry(settings_env):
    settings = load_settings()
    assert (settings.engagement_open_points, settings.engagement_click_points) == (1.0, 3.0)
    assert (settings.engagement_half_life_days, settings.engagement_interval) == (14.0, 10.0)
    config = celery_config(settings)
    entry = config["beat_schedule"]["engagement-score"]
    assert entry["task"] == "smartmail.engagement.score" and entry["schedule"] == 10.0
    assert config["task_routes"]["smartmail.engagement.*"] == {"queue": "default"}
