"""The engagement score on SQLite and PostgreSQL: the reader's updates, segment counts against Python, crashes."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, insert, select, tuple_

from smartmail.audience import contacts, engagement_score, event_stream, segments
from smartmail.audience.event_stream import Position
from smartmail.store import checkpoints
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Contact, Event, StreamCheckpoint
from tests.conftest import reset_caches, wait_for

CONTACTS = 120
POINTS = {"opened": 1.0, "clicked": 3.0}
HALF_LIFE = 14.0


def _contacts() -> list[int]:
    with get_engine().begin() as connection:
        connection.execute(insert(Contact), [{"email": f"p{i}@example.org"} for i in range(CONTACTS)])
        return list(connection.execute(select(Contact.id).order_by(Contact.id)).scalars())


def _random_events(rng: random.Random, ids: list[int], count: int, now: datetime, max_age_days: int) -> list[dict]:
    """Human and machine opens and clicks, and other events, at random times (not in time order),
    a few without a contact; contacts from the first two thirds only, so some have none."""
    rows = []
    for n in range(count):
        kind = rng.choice(["opened", "opened", "clicked", "sent", "order_placed"])
        rows.append(
            {
                "type": kind,
                "contact_id": None if rng.random() < 0.03 else rng.choice(ids[: 2 * len(ids) // 3]),
                "machine": kind in POINTS and rng.random() < 0.2,
                "occurred_at": now - timedelta(seconds=rng.randrange(0, max_age_days * 86400)),
                "properties": {"n": n},  # the row's place in `rows`
            }
        )
    return rows


def _write(rows: list[dict], transactions: int = 4) -> None:
    """The events in a few transactions (so PostgreSQL gives them several xacts), then readable."""
    size = -(-len(rows) // transactions)
    for start in range(0, len(rows), size):
        with get_engine().begin() as connection:
            connection.execute(insert(Event), rows[start : start + size])
    _settle()


def _settle() -> None:
    """Wait until every stored event is readable: the stream stops below the oldest transaction
    running anywhere on the PostgreSQL server, and other test runs may share the server."""
    with get_engine().connect() as connection:
        last = connection.execute(select(Event.xact, Event.id).order_by(Event.xact.desc(), Event.id.desc())).first()
    if last is not None:
        wait_for(lambda: event_stream.end() == Position(*last), timeout=30, message="the stream to reach its end")


def _expected(rows: list[dict], now: datetime) -> dict[int, float]:
    """Each contact's score as of `now`, from the definition."""
    scores: dict[int, float] = {}
    for row in rows:
        if row["type"] in POINTS and not row["machine"] and row["contact_id"] is not None:
            age_days = (now - row["occurred_at"]).total_seconds() / 86400
            scores[row["contact_id"]] = scores.get(row["contact_id"], 0.0) + POINTS[row["type"]] * 0.5 ** (
                age_days / HALF_LIFE
            )
    return scores


def _stored_scores(now: datetime) -> dict[int, float]:
    with get_engine().connect() as connection:
        rows = connection.execute(
            select(Contact.id, Contact.engagement_score, Contact.engagement_scored_at).where(
                Contact.engagement_key.is_not(None)
            )
        ).all()
    decay = engagement_score.Decay(POINTS["opened"], POINTS["clicked"], HALF_LIFE)
    return {row.id: decay.decayed(row.engagement_score, row.engagement_scored_at, now) for row in rows}


def _segment_count(rules: dict, now: datetime) -> int:
    query = select(func.count()).select_from(segments.audience_query(rules, now=now).subquery())
    with get_engine().connect() as connection:
        return connection.scalar(query)


def _read_everything() -> None:
    result = engagement_score.update_scores(max_seconds=60)
    assert not result.more


def _checkpoint() -> str | None:
    with get_engine().connect() as connection:
        return connection.scalar(select(StreamCheckpoint.position).where(StreamCheckpoint.name == "engagement_score"))


def _assert_scores_match(rows: list[dict], now: datetime) -> dict[int, float]:
    expected = _expected(rows, now)
    stored = _stored_scores(now)
    assert stored.keys() == expected.keys()
    for contact_id, score in expected.items():
        assert stored[contact_id] == pytest.approx(score, rel=1e-9)
    return expected


def _thresholds(scores: list[float]) -> list[float]:
    """Bounds half-way between neighbouring scores (never within rounding of one), and past both ends."""
    ordered = sorted(set(scores))
    middles = [(a + b) / 2 for a, b in zip(ordered, ordered[1:]) if b - a > 1e-6 * b]
    return [0, 1e-9, *middles[:: max(1, len(middles) // 12)], ordered[-1] * 2]


def test_segment_counts_equal_a_python_computation(env, monkeypatch):
    monkeypatch.setattr(engagement_score, "PAGE", 150)  # many pages
    rng = random.Random(22)
    ids = _contacts()
    now = utcnow()
    rows = _random_events(rng, ids, 1500, now, max_age_days=120)
    _write(rows)
    _read_everything()
    expected = _assert_scores_match(rows, now)
    scores = [expected.get(contact_id, 0.0) for contact_id in ids]
    for bound in _thresholds(scores):
        for op, test in (
            ("gte", lambda s, b=bound: s >= b),
            ("gt", lambda s, b=bound: s > b),
            ("lt", lambda s, b=bound: s < b),
            ("lte", lambda s, b=bound: s <= b),
        ):
            rules = {"engagement_score": {op: bound}}
            want = sum(1 for s in scores if test(s))
            assert _segment_count(rules, now) == want, (op, bound)
            assert _segment_count({"not": rules}, now) == CONTACTS - want, ("not", op, bound)
    # Bounds together, and with another rule.
    low, high = sorted(scores)[CONTACTS // 3] + 1e-6, sorted(scores)[-5] - 1e-6
    want = sum(1 for s in scores if low <= s < high)
    assert _segment_count({"engagement_score": {"gte": low, "lt": high}}, now) == want
    # Scores decay: a month later the same bound selects fewer (each score is a quarter and a bit).
    later = now + timedelta(days=28)
    assert _segment_count({"engagement_score": {"gte": low}}, later) == sum(1 for s in scores if s / 4 >= low)
    # count() and the contact's own answer use the clock; far from a bound, a second changes nothing.
    assert segments.count({"engagement_score": {"gte": 1e-12}}) == len(expected)
    top = max(expected, key=expected.__getitem__)
    email = f"p{ids.index(top)}@example.org"
    shown = contacts.get_contact(email)["engagement_score"]
    assert shown == pytest.approx(round(expected[top], 2), abs=0.011)
    assert engagement_score.current_score(top, now) == pytest.approx(expected[top], rel=1e-9)
    nobody = ids[-1]  # the last third has no events
    assert contacts.get_contact(f"p{CONTACTS - 1}@example.org")["engagement_score"] == 0.0
    assert engagement_score.current_score(nobody) == 0.0


def test_late_events_older_than_the_stored_score_count_as_if_in_order(env):
    rng = random.Random(5)
    ids = _contacts()
    now = utcnow()
    recent = _random_events(rng, ids, 400, now, max_age_days=3)
    _write(recent)
    _read_everything()
    # Then events from weeks before the ones already counted: each added at its own time.
    old = _random_events(rng, ids, 400, now - timedelta(days=10), max_age_days=60)
    _write(old)
    _read_everything()
    _assert_scores_match(recent + old, now)
    # Reading again finds nothing new and changes nothing.
    before = _stored_scores(now)
    assert engagement_score.update_scores(max_seconds=5).events == 0
    assert _stored_scores(now) == before


def test_a_crash_between_pages_repeats_nothing(env, monkeypatch):
    monkeypatch.setattr(engagement_score, "PAGE", 100)
    rng = random.Random(9)
    ids = _contacts()
    now = utcnow()
    rows = _random_events(rng, ids, 800, now, max_age_days=30)
    _write(rows)
    real_move = checkpoints.move
    moves = []

    def crash_on_the_third_page(connection, name, position):
        if len(moves) == 2:  # the page's UPDATE has run in this transaction: it must roll back with it
            raise RuntimeError("worker lost")
        moves.append(position)
        real_move(connection, name, position)

    monkeypatch.setattr(checkpoints, "move", crash_on_the_third_page)
    with pytest.raises(RuntimeError, match="worker lost"):
        engagement_score.update_scores(max_seconds=60)
    assert _checkpoint() == moves[-1]
    # What is stored is exactly the events up to the checkpoint: the first two pages'.
    done = Position.parse(moves[-1])
    with get_engine().connect() as connection:
        read = connection.execute(
            select(Event.properties).where(tuple_(Event.xact, Event.id) <= tuple_(done.xact, done.id))
        ).scalars()
        first_rows = [rows[properties["n"]] for properties in read]
    assert 0 < len(first_rows) < len(rows)
    partial = _stored_scores(now)
    expected_partial = _expected(first_rows, now)
    assert partial.keys() == expected_partial.keys()
    for contact_id, score in expected_partial.items():
        assert partial[contact_id] == pytest.approx(score, rel=1e-9)
    # The run after it continues from the checkpoint: every event counted once.
    monkeypatch.setattr(checkpoints, "move", real_move)
    _read_everything()
    _assert_scores_match(rows, now)


def test_rebuild_reads_everything_again_with_new_settings(env, monkeypatch):
    rng = random.Random(3)
    ids = _contacts()
    now = utcnow()
    rows = _random_events(rng, ids, 300, now, max_age_days=40)
    _write(rows)
    _read_everything()
    monkeypatch.setenv("SMARTMAIL_ENGAGEMENT_CLICK_POINTS", "6")
    monkeypatch.setenv("SMARTMAIL_ENGAGEMENT_HALF_LIFE_DAYS", "7")
    reset_caches()
    assert engagement_score.rebuild() == len(_expected(rows, now))
    _read_everything()
    decay = engagement_score.Decay(1.0, 6.0, 7.0)
    expected: dict[int, float] = {}
    for row in rows:
        if row["type"] in POINTS and not row["machine"] and row["contact_id"] is not None:
            age = (now - row["occurred_at"]).total_seconds() / 86400
            points = 6.0 if row["type"] == "clicked" else 1.0
            expected[row["contact_id"]] = expected.get(row["contact_id"], 0.0) + points * 0.5 ** (age / 7.0)
    for contact_id, score in expected.items():
        assert engagement_score.current_score(contact_id, now) == pytest.approx(score, rel=1e-9)
        with get_engine().connect() as connection:
            key = connection.scalar(select(Contact.engagement_key).where(Contact.id == contact_id))
        assert decay.score(key, now) == pytest.approx(score, rel=1e-9)


def test_the_beat_task_runs_the_reader(env):
    from smartmail.tasks.engagement import score

    ids = _contacts()
    now = utcnow()
    rows = [
        {"type": "clicked", "contact_id": ids[0], "machine": False, "occurred_at": now, "properties": {}},
        {"type": "opened", "contact_id": ids[0], "machine": True, "occurred_at": now, "properties": {}},
    ]
    _write(rows, transactions=1)
    score()  # in-process, as a worker would call it
    assert engagement_score.current_score(ids[0], now) == pytest.approx(3.0)
    assert segments.count({"engagement_score": {"gte": 2.9}}) == 1
