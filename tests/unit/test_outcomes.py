"""Unit tests for smartmail.workers.outcomes: SMTP reply classification and the retry schedule."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from smartmail.workers.outcomes import Outcome, Reply, RetrySchedule, Verdict, classify

SENT, DEFERRED, FAILED = Verdict.SENT, Verdict.DEFERRED, Verdict.FAILED


# --- Reply.enhanced -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.1.1 <bob@example.com>: Recipient address rejected", "5.1.1"),
        ("2.0.0 Ok: queued as 4F1X", "2.0.0"),
        ("4.7.0 Try again later", "4.7.0"),
        ("  5.7.1 leading spaces are tolerated", "5.7.1"),
        ("5.7.26 three-digit detail", "5.7.26"),
        ("5.123.456 three-digit subject and detail", "5.123.456"),
        ("5.1.1", "5.1.1"),  # nothing after the code
        ("5.1.1\nsecond line of a multi-line reply", "5.1.1"),
    ],
)
def test_enhanced_code_is_parsed_from_the_start_of_the_text(text, expected):
    assert Reply(550, text).enhanced == expected


@pytest.mark.parametrize(
    "text",
    [
        "Requested action not taken: mailbox unavailable",  # no enhanced code at all
        "",
        "User unknown 5.1.1",  # not leading the text
        "3.1.1 class 3 does not exist",  # RFC 3463 classes are 2, 4 and 5 only
        "5.1 only two parts",
        "5.1.1234 detail too long",  # at most three digits (RFC 3463 section 2)
        "5.1234.1 subject too long",
        "5.1.1a glued to a letter",
        "55.1.1 class too long",
    ],
)
def test_text_without_a_leading_enhanced_code_has_none(text):
    assert Reply(550, text).enhanced is None


def test_reply_str_includes_the_code_when_there_is_one():
    assert str(Reply(550, "5.1.1 no such user")) == "550 5.1.1 no such user"
    assert str(Reply(None, "connection refused")) == "connection refused"


def test_reply_is_immutable_and_comparable():
    reply = Reply(250, "ok")
    assert reply == Reply(250, "ok")
    assert reply != Reply(250, "ok!")
    with pytest.raises(AttributeError):
        reply.code = 550  # type: ignore[misc]


# --- classify -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        # 2xx: accepted (RFC 5321 section 4.2.1).
        (250, "2.0.0 Ok: queued as ABC123", Outcome(SENT)),
        (250, "OK", Outcome(SENT)),
        (251, "2.1.5 User not local; will forward", Outcome(SENT)),
        # 4xx: transient, retried later.
        (421, "4.7.0 Try again later, closing connection", Outcome(DEFERRED)),
        (421, "service not available", Outcome(DEFERRED)),
        (450, "4.2.1 Mailbox temporarily unavailable", Outcome(DEFERRED)),
        (451, "4.3.0 Local error in processing", Outcome(DEFERRED)),
        (452, "4.5.3 Too many recipients", Outcome(DEFERRED)),
        (452, "Insufficient system storage", Outcome(DEFERRED)),
        # A 4xx is transient even when the enhanced code claims a recipient problem: never suppress.
        (450, "4.1.1 Recipient address temporarily unverifiable", Outcome(DEFERRED)),
        # 5.1.x about the recipient: a hard bounce that suppresses the address.
        (550, "5.1.1 <bob@example.com>: Recipient address rejected: User unknown", Outcome(FAILED, suppress=True)),
        (550, "5.1.2 Bad destination system address", Outcome(FAILED, suppress=True)),
        (553, "5.1.3 Bad destination mailbox address syntax", Outcome(FAILED, suppress=True)),
        (550, "5.1.10 Recipient address has null MX", Outcome(FAILED, suppress=True)),
        # 5.1.7 / 5.1.8 are about the *sender* (RFC 3463 section 3.2): fail, but keep the recipient.
        (550, "5.1.7 Bad sender's mailbox address syntax", Outcome(FAILED)),
        (553, "5.1.8 Bad sender's system address", Outcome(FAILED)),
        # 5.7.x: policy, about the sender or content, not the address.
        (550, "5.7.1 Message rejected as spam", Outcome(FAILED, policy=True)),
        (554, "5.7.1 Service unavailable; client host blocked", Outcome(FAILED, policy=True)),
        (550, "5.7.26 Unauthenticated email is not accepted", Outcome(FAILED, policy=True)),
        # 552 is temporary (RFC 5321 section 4.5.3.1.10), whatever its enhanced code.
        (552, "5.2.2 Mailbox full", Outcome(DEFERRED)),
        (552, "Too many recipients", Outcome(DEFERRED)),
        # Other 5xx: permanent, no suppression, no policy flag.
        (554, "Transaction failed", Outcome(FAILED)),
        (550, "Requested action not taken: mailbox unavailable", Outcome(FAILED)),
        (554, "5.6.0 Message content rejected", Outcome(FAILED)),
        (550, "5.2.1 Mailbox disabled", Outcome(FAILED)),
        (500, "5.5.2 Syntax error, command unrecognized", Outcome(FAILED)),
        # A 5xx carrying a 4.x.x enhanced code: the finer signal says transient.
        (550, "4.2.0 Greylisted, please try again", Outcome(DEFERRED)),
        (554, "4.7.1 Temporarily rejected", Outcome(DEFERRED)),
        # No reply at all (refused, reset, timeout).
        (None, "connection to relay:25 failed: [Errno 111] Connection refused", Outcome(DEFERRED)),
        (None, "", Outcome(DEFERRED)),
        # Not a final reply where one belongs: a protocol error, retried.
        (354, "End data with <CR><LF>.<CR><LF>", Outcome(DEFERRED)),
        (220, "relay ESMTP", Outcome(SENT)),  # any 2xx counts as accepted
        (199, "odd", Outcome(DEFERRED)),
        (600, "out of range", Outcome(DEFERRED)),
        (0, "zero", Outcome(DEFERRED)),
    ],
    ids=lambda v: repr(v) if not isinstance(v, Outcome) else "",
)
def test_classify(code, text, expected):
    assert classify(Reply(code, text)) == expected


def test_only_5_1_recipient_subjects_suppress():
    suppressing = {f"5.1.{d}" for d in range(0, 20) if classify(Reply(550, f"5.1.{d} x")).suppress}
    assert "5.1.7" not in suppressing and "5.1.8" not in suppressing
    assert {"5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"} <= suppressing
    # No other subject suppresses.
    for subject in (0, 2, 3, 4, 5, 6, 7):
        assert not classify(Reply(550, f"5.{subject}.1 x")).suppress


def test_policy_is_only_set_for_5_7():
    assert classify(Reply(550, "5.7.0 x")).policy
    assert not classify(Reply(550, "5.1.1 x")).policy
    assert not classify(Reply(421, "4.7.0 x")).policy  # a 4.7.x deferral is not a permanent policy failure
    assert not classify(Reply(None, "5.7.1 looks like a code but there was no reply")).policy


def test_outcome_defaults():
    outcome = Outcome(Verdict.SENT)
    assert outcome.suppress is False and outcome.policy is False
    assert Verdict.DEFERRED == "deferred" and Verdict("failed") is Verdict.FAILED


# --- RetrySchedule ------------------------------------------------------------------------------

CREATED = datetime(2024, 1, 1, 12, 0, 0)
NO_JITTER = RetrySchedule(first_interval=60, backoff_factor=2, max_interval=3600, jitter=0, max_age=30 * 86400)


def _delay(schedule: RetrySchedule, attempts: int, now: datetime = CREATED, **kw) -> float | None:
    due = schedule.next_attempt(attempts, CREATED, now, **kw)
    return None if due is None else (due - now).total_seconds()


@pytest.mark.parametrize(("attempts", "seconds"), [(0, 60), (1, 60), (2, 120), (3, 240), (4, 480), (6, 1920)])
def test_backoff_grows_exponentially_from_the_first_interval(attempts, seconds):
    assert _delay(NO_JITTER, attempts) == seconds


@pytest.mark.parametrize("attempts", [7, 8, 20, 100])
def test_backoff_is_capped_at_max_interval(attempts):
    assert _delay(NO_JITTER, attempts) == 3600


def test_backoff_factor_one_is_a_constant_interval():
    schedule = RetrySchedule(first_interval=300, backoff_factor=1, max_interval=3600, jitter=0, max_age=86400)
    assert {_delay(schedule, n) for n in range(1, 10)} == {300}


def test_next_attempt_is_relative_to_now_not_creation():
    now = CREATED + timedelta(hours=5)
    assert NO_JITTER.next_attempt(2, CREATED, now) == now + timedelta(seconds=120)


@pytest.mark.parametrize("attempts", [1, 3, 10])
def test_jitter_stays_within_bounds(attempts):
    schedule = RetrySchedule(first_interval=100, backoff_factor=2, max_interval=1000, jitter=0.2, max_age=86400)
    base = min(100 * 2 ** (attempts - 1), 1000)
    rng = random.Random(1234)
    delays = [_delay(schedule, attempts, rng=rng) for _ in range(2000)]
    assert all(base * 0.8 - 1e-6 <= d <= base * 1.2 + 1e-6 for d in delays)
    # And it really spreads: both sides of the base are used, over most of the range.
    assert min(delays) < base * 0.85 and max(delays) > base * 1.15
    assert len(set(delays)) > 1000


def test_jitter_is_reproducible_with_a_seeded_rng():
    schedule = RetrySchedule(jitter=0.5)
    first = [_delay(schedule, 3, rng=random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert _delay(schedule, 3, rng=random.Random(8)) != first[0]


def test_jitter_applies_on_top_of_the_cap():
    schedule = RetrySchedule(first_interval=60, backoff_factor=2, max_interval=600, jitter=0.1, max_age=86400)
    delays = [_delay(schedule, 50, rng=random.Random(seed)) for seed in range(200)]
    assert all(540 - 1e-6 <= d <= 660 + 1e-6 for d in delays)


def test_full_jitter_never_schedules_in_the_past():
    schedule = RetrySchedule(first_interval=60, jitter=1.0, max_age=86400)
    rng = random.Random(3)
    assert all(_delay(schedule, 1, rng=rng) >= 0 for _ in range(1000))


def test_without_an_rng_the_module_random_is_used(monkeypatch):
    import smartmail.workers.outcomes as outcomes

    monkeypatch.setattr(outcomes.random, "uniform", lambda a, b: b)  # always the top of the range
    schedule = RetrySchedule(first_interval=100, jitter=0.25, max_age=86400)
    assert _delay(schedule, 1) == 125


def test_returns_none_once_the_retry_would_be_past_max_age():
    schedule = RetrySchedule(first_interval=60, backoff_factor=2, max_interval=3600, jitter=0, max_age=3600)
    # Due at exactly created + max_age is still allowed...
    assert schedule.next_attempt(1, CREATED, CREATED + timedelta(seconds=3540)) == CREATED + timedelta(seconds=3600)
    # ...one second later is not.
    assert schedule.next_attempt(1, CREATED, CREATED + timedelta(seconds=3541)) is None
    assert schedule.next_attempt(1, CREATED, CREATED + timedelta(days=2)) is None


def test_max_age_ends_a_realistic_retry_sequence():
    schedule = RetrySchedule()  # defaults: 60 s doubling to 1 h, 20 % jitter, 3 days
    rng = random.Random(42)
    now, attempts = CREATED, 0
    while True:
        attempts += 1
        due = schedule.next_attempt(attempts, CREATED, now, rng=rng)
        if due is None:
            break
        assert due > now
        assert due <= CREATED + timedelta(days=3)
        now = due
        assert attempts < 1000, "the schedule never gave up"
    # 3 days at <= 1.2 h per retry after the ramp-up: dozens of attempts, not a handful and not hundreds.
    assert 55 <= attempts <= 100
    assert now > CREATED + timedelta(days=3) - timedelta(hours=1.2)


def test_defaults():
    schedule = RetrySchedule()
    assert (
        schedule.first_interval,
        schedule.backoff_factor,
        schedule.max_interval,
        schedule.jitter,
        schedule.max_age,
    ) == (60.0, 2.0, 3600.0, 0.2, 3 * 86400.0)


def test_very_many_attempts_are_still_capped():
    # Floats, as Settings (pydantic float fields) hand them to the schedule.
    schedule = RetrySchedule(first_interval=1.0, backoff_factor=2.0, max_interval=10.0, jitter=0.0, max_age=1e9)
    assert _delay(schedule, 1100) == 10


def test_reply_stage_changes_the_verdict():
    from smartmail.workers.outcomes import Reply, Verdict, classify

    lost_after_body = classify(Reply(None, "connection lost at DATA", "data"))
    assert lost_after_body.verdict is Verdict.UNKNOWN  # the relay may have accepted it
    assert classify(Reply(None, "connection lost at RCPT", "rcpt")).verdict is Verdict.DEFERRED
    sender_refused = classify(Reply(550, "5.1.0 Sender address rejected", "mail"))
    assert sender_refused.verdict is Verdict.DEFERRED and not sender_refused.suppress
    assert classify(Reply(530, "5.7.0 Authentication required", "rcpt")).verdict is Verdict.DEFERRED
    assert classify(Reply(552, "5.3.4 Message too big", "data")).verdict is Verdict.FAILED
    assert classify(Reply(552, "5.5.3 Too many recipients", "rcpt")).verdict is Verdict.DEFERRED
    bounce = classify(Reply(550, "5.1.1 User unknown", "rcpt"))
    assert bounce.verdict is Verdict.FAILED and bounce.suppress
