"""The per-site Redis state (fakeredis with Lua): GCRA rate limiting on an exact clock, slow-downs,
suspensions, the spreading of refused messages, connection leases and counters."""

from __future__ import annotations

import itertools
import re
import time

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmail.workers.limiter import COUNTERS, Grant, SiteThrottle, interval_us
from smartmail.workers.outcomes import RetrySchedule
from smartmail.workers.policy import Rule, Site

S = 1_000_000  # microseconds per second


def make_site(rate: float | None, burst: int = 1, name: str = "site", max_connections: int = 2) -> Site:
    return Site(
        name=name,
        rate=rate,
        burst=burst,
        max_connections=max_connections,
        max_messages_per_connection=100,
        retry=RetrySchedule(),
    )


def slow_rule(
    *,
    rate: float | None = None,
    factor: float | None = None,
    duration: float = 60.0,
    recover_after: float = 120.0,
    recover_step: float = 0.1,
) -> Rule:
    return Rule(re.compile("^4"), "slow", rate, factor, duration, recover_after, recover_step)


def suspend_rule(duration: float = 60.0) -> Rule:
    return Rule(re.compile("^421"), "suspend", None, None, duration)


def us(seconds: float) -> int:
    return round(seconds * S)


@pytest.fixture
def client():
    return fakeredis.FakeRedis()


@pytest.fixture
def throttle(client):
    return SiteThrottle(client, prefix="t:")


def test_interval_is_whole_microseconds_per_message():
    assert interval_us(10) == 100_000
    assert interval_us(0.5) == 2_000_000
    assert interval_us(None) == 0
    assert interval_us(5_000_000) == 1  # never 0, which would mean unlimited


# --- GCRA: burst, steady rate, exact retry_after ------------------------------------------------


@pytest.mark.parametrize("burst", [1, 7, 100])
def test_a_fresh_bucket_grants_exactly_the_burst_at_once(throttle, burst):
    site = make_site(10, burst)
    assert throttle.acquire(site, burst + 5, now_us=S).granted == burst
    assert throttle.acquire(site, 1, now_us=S).granted == 0


def test_a_fresh_bucket_grants_the_burst_to_single_acquisitions_too(throttle):
    site = make_site(10, 4)
    results = [throttle.acquire(site, 1, now_us=S).granted for _ in range(6)]
    assert results == [1, 1, 1, 1, 0, 0]


def test_after_the_burst_exactly_one_token_per_interval(throttle):
    site = make_site(10, 3)  # one every 100,000 µs
    t0 = 5 * S
    assert throttle.acquire(site, 3, now_us=t0).granted == 3
    for k in range(1, 21):
        due = t0 + k * 100_000
        assert throttle.acquire(site, 5, now_us=due - 1).granted == 0, k
        assert throttle.acquire(site, 5, now_us=due).granted == 1, k
        assert throttle.acquire(site, 5, now_us=due).granted == 0, k
        assert throttle.acquire(site, 5, now_us=due + 99_999).granted == 0, k


def test_a_batch_taken_late_gets_every_token_that_came_due_up_to_the_burst(throttle):
    site = make_site(10, 5)
    assert throttle.acquire(site, 5, now_us=0).granted == 5
    assert throttle.acquire(site, 100, now_us=350_000).granted == 3  # tokens at 100k, 200k, 300k
    assert throttle.acquire(site, 100, now_us=399_999).granted == 0
    assert throttle.acquire(site, 100, now_us=400_000).granted == 1


@pytest.mark.parametrize("rate", [10, 7, 1 / 60, 3000])
@pytest.mark.parametrize("offset", [0, 1, 12_345])
def test_retry_after_is_exact_to_the_microsecond(throttle, rate, offset):
    site = make_site(rate, 2)
    interval = interval_us(rate)
    t0 = 10 * S
    assert throttle.acquire(site, 2, now_us=t0).granted == 2
    now = t0 + offset % interval
    refused = throttle.acquire(site, 3, now_us=now)
    assert refused.granted == 0
    wait = us(refused.retry_after)
    assert wait == interval - offset % interval  # the next token is due one interval after t0
    assert throttle.acquire(site, 1, now_us=now + wait - 1).granted == 0
    assert throttle.acquire(site, 1, now_us=now + wait).granted == 1


def test_retry_after_of_a_partial_grant_points_at_the_next_token(throttle):
    site = make_site(4, 3)  # 250,000 µs
    grant = throttle.acquire(site, 10, now_us=0)
    assert (grant.granted, us(grant.retry_after), us(grant.spacing)) == (3, 250_000, 250_000)
    assert throttle.acquire(site, 1, now_us=249_999).granted == 0
    assert throttle.acquire(site, 1, now_us=250_000).granted == 1


# --- batch acquisition --------------------------------------------------------------------------


def test_a_batch_is_the_same_as_that_many_single_acquisitions(client):
    site = make_site(10, 5)
    batched, single = SiteThrottle(client, prefix="batch:"), SiteThrottle(client, prefix="single:")
    steps = [
        (0, 3),
        (0, 4),
        (150_000, 2),
        (150_000, 10),
        (420_000, 1),
        (2 * S, 7),
        (2 * S + 50_000, 3),
        (2 * S + 300_000, 9),
    ]
    for now, n in steps:
        got = batched.acquire(site, n, now_us=now).granted
        singles = sum(single.acquire(site, 1, now_us=now).granted for _ in range(n))
        assert got == singles, (now, n)
        assert client.get("batch:smartmail:site:site:tat") == client.get("single:smartmail:site:site:tat")
    # and both buckets go on the same way
    for now in (2 * S + 300_000, 2 * S + 400_000, 2 * S + 450_000, 3 * S):
        assert batched.acquire(site, 1, now_us=now).granted == single.acquire(site, 1, now_us=now).granted


def test_a_batch_grants_min_of_n_and_what_is_available(throttle):
    site = make_site(10, 5)
    assert throttle.acquire(site, 2, now_us=0).granted == 2  # fewer asked than available
    assert throttle.acquire(site, 9, now_us=0).granted == 3  # the rest of the burst
    assert throttle.acquire(site, 0, now_us=0).granted == 0


# --- properties (hypothesis) --------------------------------------------------------------------

_prefixes = (f"p{i}:" for i in itertools.count())
_shared = fakeredis.FakeRedis()
# Rates whose interval is a whole number of microseconds, so the bound burst + rate * W is exact.
_EXACT_RATES = [1, 2, 4, 5, 8, 10, 25, 40, 125, 1000]


@st.composite
def _scenario(draw):
    rate = draw(st.sampled_from(_EXACT_RATES))
    burst = draw(st.integers(1, 12))
    interval = S // rate
    step = st.one_of(
        st.just(0), st.integers(0, interval), st.integers(0, 3 * interval), st.integers(0, (burst + 2) * interval)
    )
    steps = draw(st.lists(st.tuples(step, st.integers(0, 2 * burst + 3)), min_size=1, max_size=25))
    return rate, burst, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenario())
def test_property_no_window_exceeds_burst_plus_rate_and_no_grant_without_capacity(scenario):
    rate, burst, steps = scenario
    site = make_site(rate, burst)
    throttle = SiteThrottle(_shared, prefix=next(_prefixes))
    interval = S // rate
    # An independent model: a token bucket holding `credit` microseconds of sending time.
    credit = burst * interval
    now = 7 * S
    grants: list[tuple[int, int]] = []
    for dt, n in steps:
        now += dt
        credit = min(burst * interval, credit + dt)
        available = credit // interval
        grant = throttle.acquire(site, n, now_us=now)
        if available == 0:
            assert grant.granted == 0, "granted with no remaining capacity"
        assert grant.granted == min(n, available)
        credit -= grant.granted * interval
        if grant.granted < n:
            assert us(grant.retry_after) == interval - credit
        grants.append((now, grant.granted))
    limit = burst + rate * 1  # W = 1 s
    for start, _ in grants:
        in_window = sum(g for t, g in grants if start <= t < start + S)
        assert in_window <= limit, (start, in_window, limit)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.sampled_from(_EXACT_RATES),
    burst=st.integers(1, 10),
    calls=st.lists(st.tuples(st.integers(0, 5 * S), st.integers(0, 20)), min_size=1, max_size=20),
)
def test_property_a_clock_going_back_and_forth_never_grants_more_than_the_bucket_allows(rate, burst, calls):
    site = make_site(rate, burst)
    throttle = SiteThrottle(_shared, prefix=next(_prefixes))
    total = sum(throttle.acquire(site, n, now_us=t).granted for t, n in calls)  # never raises
    times = [t for t, _ in calls]
    assert total <= burst + (max(times) - min(times)) // (S // rate)


# --- clock edge cases ---------------------------------------------------------------------------


def test_a_clock_going_backwards_grants_nothing_extra_and_does_not_error(throttle):
    site = make_site(10, 3)
    t0 = 100 * S
    assert throttle.acquire(site, 3, now_us=t0).granted == 3
    for earlier in (0, t0 - S, t0 - 1):
        grant = throttle.acquire(site, 10, now_us=earlier)
        assert grant.granted == 0
        assert us(grant.retry_after) == t0 + 100_000 - earlier
    # the bucket is where it was: the next token is still due at t0 + interval
    assert throttle.acquire(site, 1, now_us=t0 + 99_999).granted == 0
    assert throttle.acquire(site, 10, now_us=t0 + 100_000).granted == 1


def test_a_backwards_clock_within_the_burst_only_hands_out_what_is_left(throttle):
    site = make_site(10, 5)
    assert throttle.acquire(site, 2, now_us=S).granted == 2
    # Seen from 50 ms earlier the bucket holds 2.5 tokens, not the 3 left at S (nor a fresh 5).
    assert throttle.acquire(site, 10, now_us=S - 50_000).granted == 2
    assert throttle.acquire(site, 10, now_us=S).granted == 1  # 5 in all by S: the burst, no more
    assert throttle.acquire(site, 10, now_us=S).granted == 0
    assert throttle.acquire(site, 10, now_us=S - 10 * S).granted == 0


def test_a_long_idle_gap_restores_exactly_the_burst(throttle):
    site = make_site(10, 4)
    assert throttle.acquire(site, 4, now_us=0).granted == 4
    later = 30 * 86_400 * S  # a month idle
    assert throttle.acquire(site, 1000, now_us=later).granted == 4
    assert throttle.acquire(site, 1, now_us=later).granted == 0
    assert throttle.acquire(site, 1, now_us=later + 100_000).granted == 1


def test_a_high_rate_with_a_fractional_interval_never_exceeds_the_configured_rate(throttle):
    # 3000/s is 333.33 µs per message. Rounding the interval down to 333 µs lets 3003 through per second.
    site = make_site(3000, 5000)
    assert throttle.acquire(site, 5000, now_us=0).granted == 5000
    in_first_second = throttle.acquire(site, 10_000, now_us=S - 1).granted
    assert 5000 + in_first_second <= 5000 + 3000, f"{in_first_second} tokens after the burst within 1 s at 3000/s"


def test_a_high_rate_keeps_its_pace_within_a_fraction_of_a_percent(throttle):
    site = make_site(3000, 100)
    assert throttle.acquire(site, 100, now_us=0).granted == 100
    # 75 tokens come due every 25 ms, fewer than the burst, so every one of them is taken.
    total = sum(throttle.acquire(site, 1000, now_us=t).granted for t in range(25_000, 10 * S + 1, 25_000))
    assert 29_900 <= total <= 30_100  # 10 s at 3000/s, within 1/3 %


def test_a_huge_n_grants_the_burst_and_says_when_the_rest_may_go(throttle):
    site = make_site(10, 5)
    grant = throttle.acquire(site, 10**12, now_us=0)
    assert (grant.granted, us(grant.retry_after), us(grant.first_wait), us(grant.spacing)) == (
        5,
        100_000,
        100_000,
        100_000,
    )
    assert throttle.acquire(site, 1, now_us=100_000).granted == 1


def test_a_huge_n_on_a_unlimited_site_is_granted_whole(throttle):
    assert throttle.acquire(make_site(None), 10**12).granted == 10**12


def test_an_even_larger_n_does_not_error(throttle):
    # The promise key's expiry (rest * interval in ms) overflows what Redis' SET PX accepts.
    grant = throttle.acquire(make_site(10, 5), 10**15, now_us=0)
    assert grant.granted == 5


# --- unlimited sites, suspensions and slow-downs ------------------------------------------------


def test_an_unlimited_site_grants_everything(throttle):
    grant = throttle.acquire(make_site(None), 5000, now_us=0)
    assert grant == Grant(5000, 0.0, 0.0, 0.0, False)
    assert throttle.acquire(make_site(None), 5000, now_us=0).granted == 5000


@pytest.mark.parametrize("rate", [None, 10])
def test_a_suspension_grants_nothing_and_says_for_how_long(throttle, rate):
    site = make_site(rate, 5)
    assert throttle.apply_rule(site, suspend_rule(duration=60), "421 4.7.0 [TS01] deferred").changed is True
    grant = throttle.acquire(site, 7, now_us=0)
    assert grant.granted == 0 and grant.suspended is True
    assert 59.0 < grant.retry_after <= 60.0
    assert grant.first_wait == grant.retry_after and grant.spacing == 0
    assert throttle.acquire(make_site(rate, 5, name="other"), 1, now_us=0).granted == 1  # other sites go on


def test_a_suspension_lifts_on_its_own(throttle):
    site = make_site(None)
    throttle.apply_rule(site, suspend_rule(duration=0.05), "421 blocked")
    assert throttle.acquire(site, 1).suspended
    time.sleep(0.08)
    grant = throttle.acquire(site, 3)
    assert grant.granted == 3 and not grant.suspended


def test_a_refusal_for_lack_of_tokens_is_not_a_suspension(throttle):
    site = make_site(10, 1)
    throttle.acquire(site, 1, now_us=0)
    grant = throttle.acquire(site, 1, now_us=0)
    assert grant.granted == 0 and grant.suspended is False


def test_a_slow_rule_with_a_rate_paces_an_unlimited_site(throttle):
    site = make_site(None, 2)
    assert throttle.apply_rule(site, slow_rule(rate=10), "421 too many").changed is True
    assert throttle.acquire(site, 10, now_us=0).granted == 2  # the site's burst at the slowed interval
    refused = throttle.acquire(site, 3, now_us=0)
    assert (refused.granted, us(refused.retry_after), us(refused.spacing)) == (0, 100_000, 100_000)
    assert throttle.acquire(site, 3, now_us=99_999).granted == 0
    assert throttle.acquire(site, 3, now_us=100_000).granted == 1
    assert throttle.state("site").slowed_rate == pytest.approx(10)


def test_a_slow_rule_with_a_rate_paces_a_limited_site(throttle):
    site = make_site(100, 1)
    assert throttle.apply_rule(site, slow_rule(rate=4), "421 too many").changed is True
    assert throttle.acquire(site, 5, now_us=0).granted == 1
    assert throttle.acquire(site, 5, now_us=249_999).granted == 0  # not 10,000 µs (100/s)
    assert throttle.acquire(site, 5, now_us=250_000).granted == 1


def test_a_slow_rule_never_speeds_a_limited_site_up(throttle):
    site = make_site(10, 1)
    throttle.apply_rule(site, slow_rule(rate=1000), "421 too many")
    assert throttle.acquire(site, 5, now_us=0).granted == 1
    assert throttle.acquire(site, 5, now_us=99_999).granted == 0
    assert throttle.acquire(site, 5, now_us=100_000).granted == 1


def test_a_factor_rule_halves_a_limited_site(throttle):
    site = make_site(10, 1)
    assert throttle.apply_rule(site, slow_rule(factor=0.5), "421 rate limited").changed is True
    assert throttle.state("site").slowed_rate == pytest.approx(5)
    assert throttle.acquire(site, 5, now_us=0).granted == 1
    assert throttle.acquire(site, 5, now_us=100_000).granted == 0
    assert throttle.acquire(site, 5, now_us=199_999).granted == 0
    assert throttle.acquire(site, 5, now_us=200_000).granted == 1


def test_a_factor_rule_is_ignored_on_an_unlimited_site(throttle, client):
    site = make_site(None)
    assert throttle.apply_rule(site, slow_rule(factor=0.5), "421 rate limited").changed is False
    assert client.keys("*") == []
    assert throttle.acquire(site, 500, now_us=0).granted == 500
    assert throttle.state("site").slowed_rate is None


def test_a_less_severe_slow_down_does_not_speed_the_site_up(throttle):
    site = make_site(10, 1)
    assert throttle.apply_rule(site, slow_rule(factor=0.25), "421 a").changed is True  # 2.5/s
    assert throttle.apply_rule(site, slow_rule(factor=0.5), "421 b").changed is False  # 5/s: less severe
    assert throttle.state("site").slowed_rate == pytest.approx(2.5)
    assert throttle.acquire(site, 1, now_us=0).granted == 1
    assert throttle.acquire(site, 1, now_us=399_999).granted == 0
    assert throttle.acquire(site, 1, now_us=400_000).granted == 1
    assert throttle.apply_rule(site, slow_rule(factor=0.1), "421 c").changed is True  # 1/s: more severe
    assert throttle.state("site").slowed_rate == pytest.approx(1)


def test_a_less_severe_slow_down_does_not_cut_a_severe_one_short(throttle):
    site = make_site(10, 1)
    throttle.apply_rule(site, slow_rule(factor=0.1, duration=1800), "421 severe")
    throttle.apply_rule(site, slow_rule(factor=0.5, duration=1), "421 mild")
    state = throttle.state("site")
    assert state.slowed_rate == pytest.approx(1)
    assert state.slowed_for > 1790, f"the 30-minute slow-down now ends in {state.slowed_for} s"


def test_a_repeated_suspension_does_not_cut_the_first_one_short(throttle):
    site = make_site(None)
    assert throttle.apply_rule(site, suspend_rule(duration=3600), "421 blocked for an hour").changed is True
    assert throttle.apply_rule(site, suspend_rule(duration=1), "421 blocked briefly").changed is False
    assert throttle.state("site").suspended_for > 3590


def test_apply_rule_is_true_only_when_it_changed_the_state(throttle):
    site = make_site(10)
    assert throttle.apply_rule(site, slow_rule(factor=0.5), "421 x").changed is True
    assert throttle.apply_rule(site, slow_rule(factor=0.5), "421 x").changed is False  # the same again
    assert throttle.apply_rule(site, suspend_rule(), "421 y").changed is True
    assert throttle.apply_rule(site, suspend_rule(), "421 y").changed is False
    assert throttle.apply_rule(site, Rule(re.compile("^5"), "bounce", None, None, 60), "550 no").changed is False


def test_a_repeated_slow_down_extends_it(throttle):
    site = make_site(10)
    throttle.apply_rule(site, slow_rule(factor=0.5, duration=10), "421 x")
    assert throttle.apply_rule(site, slow_rule(factor=0.5, duration=600), "421 x").changed is False
    assert 590 < throttle.state("site").slowed_for <= 600


# --- recovery: additive increase after quiet periods, on a clock the test controls --------------


def halving(duration: float = 3600.0, after: float = 60.0, step: float = 0.1) -> Rule:
    return slow_rule(factor=0.5, duration=duration, recover_after=after, recover_step=step)


def rate_at(throttle, site: Site, seconds: float) -> float | None:
    return throttle.state(site.name, site.rate, now_us=us(seconds)).slowed_rate


def test_a_slowed_site_climbs_back_a_step_per_quiet_period(throttle):
    site = make_site(10)
    armed = throttle.apply_rule(site, halving(), "421 try again later", now_us=0)
    assert armed.changed and armed.rate == pytest.approx(5)
    state = throttle.state("site", 10, now_us=us(59.9))
    assert state.slowed_rate == pytest.approx(5) and not state.recovering
    assert state.next_step_in == pytest.approx(0.1) and state.slowed_for == pytest.approx(240.1)  # 5 steps of 1/s
    state = throttle.state("site", 10, now_us=us(60))
    assert state.slowed_rate == pytest.approx(6) and state.recovering and state.slowed_for == pytest.approx(240)
    assert [rate_at(throttle, site, t) for t in (120, 180, 299.9)] == pytest.approx([7, 8, 9])
    assert rate_at(throttle, site, 300) is None  # back at the configured rate


def test_the_limiter_paces_at_the_recovering_rate(throttle):
    site = make_site(10)
    throttle.apply_rule(site, halving(), "421 try again later", now_us=0)
    t = us(60)  # 6/s: one token every 166,667 µs
    assert throttle.acquire(site, 5, now_us=t).granted == 1
    assert throttle.acquire(site, 5, now_us=t + 166_666).granted == 0
    assert throttle.acquire(site, 5, now_us=t + 166_667).granted == 1
    t = us(300)  # the configured 10/s again
    assert throttle.acquire(site, 5, now_us=t).granted == 1
    assert throttle.acquire(site, 5, now_us=t + 100_000).granted == 1


def test_a_matching_reply_during_recovery_cuts_from_the_rate_in_force(throttle):
    site = make_site(10)
    throttle.apply_rule(site, halving(), "421 a", now_us=0)
    assert rate_at(throttle, site, 130) == pytest.approx(7)
    armed = throttle.apply_rule(site, halving(), "421 b", now_us=us(130))
    assert armed.changed and armed.rate == pytest.approx(3.5)
    assert rate_at(throttle, site, 189.9) == pytest.approx(3.5)  # a new quiet period from the reply
    assert rate_at(throttle, site, 190) == pytest.approx(4.5)
    assert throttle.state("site", 10, now_us=us(190)).slowed_for == pytest.approx(5 * 60 + 60)  # 6.5/s to go


def test_replies_within_a_quiet_period_cut_once_but_restart_it(throttle):
    site = make_site(10)
    throttle.apply_rule(site, halving(), "421 a", now_us=0)
    armed = throttle.apply_rule(site, halving(), "421 in flight", now_us=us(30))
    assert not armed.changed and armed.rate == pytest.approx(5)
    assert rate_at(throttle, site, 89.9) == pytest.approx(5)  # not 6: the quiet period began at 30 s
    assert rate_at(throttle, site, 90) == pytest.approx(6)


def test_a_factor_never_takes_a_site_below_one_a_minute(throttle):
    site = make_site(0.05)  # 3/min
    rule = slow_rule(factor=0.1, duration=3600, recover_after=60, recover_step=0)
    assert throttle.apply_rule(site, rule, "421 a", now_us=0).rate == pytest.approx(1 / 60)
    assert throttle.apply_rule(site, rule, "421 b", now_us=us(60)).rate == pytest.approx(1 / 60)


def test_a_zero_step_holds_the_slowed_rate_until_the_duration(throttle):
    site = make_site(10)
    throttle.apply_rule(site, halving(duration=600, step=0), "421 a", now_us=0)
    state = throttle.state("site", 10, now_us=us(599))
    assert state.slowed_rate == pytest.approx(5) and state.next_step_in is None and state.slowed_for == 1
    assert rate_at(throttle, site, 600) is None


def test_the_duration_caps_a_slow_recovery(throttle):
    site = make_site(10)
    throttle.apply_rule(site, halving(duration=150), "421 a", now_us=0)
    assert throttle.state("site", 10, now_us=us(120)).slowed_for == pytest.approx(30)
    assert rate_at(throttle, site, 149) == pytest.approx(7)
    assert rate_at(throttle, site, 150) is None


def test_an_unlimited_site_climbs_by_steps_of_the_rules_rate_until_the_duration(throttle):
    site = make_site(None)
    throttle.apply_rule(site, slow_rule(rate=10, duration=600, recover_after=60, recover_step=0.5), "421", now_us=0)
    assert [rate_at(throttle, site, t) for t in (0, 60, 599)] == pytest.approx([10, 15, 55])
    assert throttle.state("site", None, now_us=0).slowed_for == pytest.approx(600)
    assert rate_at(throttle, site, 600) is None


def test_a_rate_rule_during_recovery_cuts_to_its_rate(throttle):
    site = make_site(10)
    rule = slow_rule(rate=4, duration=3600, recover_after=60, recover_step=0.1)
    throttle.apply_rule(site, rule, "421 a", now_us=0)
    assert rate_at(throttle, site, 60) == pytest.approx(5)
    assert throttle.apply_rule(site, rule, "421 b", now_us=us(61)).changed
    assert rate_at(throttle, site, 61) == pytest.approx(4)


def test_the_key_expires_once_back_at_full_rate(throttle, client):
    site = make_site(10)
    throttle.apply_rule(site, halving(after=2), "421 a")
    assert 10_000 < client.pttl("t:smartmail:site:site:slowdown") <= 11_000  # five steps of 2 s, and a margin


def test_acquire_stays_one_round_trip_during_a_slow_down(throttle, client, monkeypatch):
    site = make_site(10)
    throttle.apply_rule(site, halving(), "421 a", now_us=0)
    throttle.acquire(site, 1, now_us=0)  # the first call of a process loads the script
    commands = []
    execute = client.execute_command
    monkeypatch.setattr(client, "execute_command", lambda *a, **k: commands.append(a[0]) or execute(*a, **k))
    assert throttle.acquire(site, 3, now_us=us(61)).spacing == pytest.approx(1 / 6, abs=1e-6)
    assert commands == ["EVALSHA"]


# --- spreading the refused messages ("promise") -------------------------------------------------


def _slots(grant: Grant, now: int, refused: int) -> list[int]:
    return [now + us(grant.first_wait) + i * us(grant.spacing) for i in range(refused)]


def test_refused_batches_get_successive_non_overlapping_slots(throttle):
    site = make_site(10, 2)
    batches = [(0, 5), (0, 4), (50_000, 2), (250_000, 3)]
    taken: list[int] = []
    for now, n in batches:
        grant = throttle.acquire(site, n, now_us=now)
        slots = _slots(grant, now, n - grant.granted)
        assert us(grant.spacing) == 100_000
        assert slots[0] >= now + us(grant.retry_after)  # never before the next token
        if taken:
            assert slots[0] == taken[-1] + 100_000  # right after the previous batch's last slot
        taken.extend(slots)
    assert taken == [100_000 * k for k in range(1, len(taken) + 1)]
    # The fourth batch, at 250,000, found the bucket full again (2 tokens): 1 refused.
    assert len(taken) == len(set(taken)) == 3 + 4 + 2 + 1


def test_refused_messages_start_at_the_next_token_once_earlier_promises_are_past(throttle):
    site = make_site(10, 1)
    throttle.acquire(site, 3, now_us=0)  # promises 100,000 and 200,000
    grant = throttle.acquire(site, 3, now_us=S + 30_000)
    assert grant.granted == 1
    assert us(grant.first_wait) == us(grant.retry_after) == 100_000


def test_nothing_refused_means_no_wait(throttle):
    grant = throttle.acquire(make_site(10, 5), 5, now_us=0)
    assert (grant.granted, grant.first_wait) == (5, 0)


# --- connection leases --------------------------------------------------------------------------


def test_leases_up_to_max_connections_and_release_frees_one(throttle):
    site = make_site(None, max_connections=2)
    assert throttle.lease_connection(site, "a") is True
    assert throttle.lease_connection(site, "b") is True
    assert throttle.lease_connection(site, "c") is False
    assert throttle.state("site").connections == 2
    throttle.release_connection("site", "a")
    assert throttle.state("site").connections == 1
    assert throttle.lease_connection(site, "c") is True
    assert throttle.lease_connection(site, "d") is False
    assert throttle.lease_connection(make_site(None, name="other", max_connections=2), "d") is True


def test_an_expired_lease_frees_its_slot(throttle, client):
    site = make_site(None, max_connections=2)
    throttle.lease_connection(site, "a")
    throttle.lease_connection(site, "b")
    client.zadd("t:smartmail:site:site:connections", {"a": 1})  # expired long ago
    assert throttle.state("site").connections == 1
    assert throttle.lease_connection(site, "c") is True
    assert throttle.lease_connection(site, "d") is False


def test_leases_expire_with_time(client):
    # 300 ms: long enough that a stall between the first two calls does not expire the lease (seen at 40 ms).
    throttle = SiteThrottle(client, prefix="tiny:", lease_ms=300)
    site = make_site(None, max_connections=1)
    assert throttle.lease_connection(site, "a") is True
    assert throttle.lease_connection(site, "b") is False
    time.sleep(0.4)
    assert throttle.state("site").connections == 0
    assert throttle.lease_connection(site, "b") is True
    assert throttle.renew_connections("site", ["a", "b"]) == ["a"]


def test_a_site_is_wanted_for_two_seconds_after_a_refused_lease(throttle, client):
    throttle.want_connection("busy")
    assert throttle.wanted(["busy", "calm"]) == {"busy"}
    assert 1900 <= client.pttl(throttle._key("busy", "wanted")) <= 2000


def test_renew_returns_lost_leases_and_keeps_live_ones(throttle, client):
    site = make_site(None, max_connections=2)
    key = "t:smartmail:site:site:connections"
    throttle.lease_connection(site, "live")
    throttle.lease_connection(site, "dying")
    client.zadd(key, {"dying": 1})
    before = client.zscore(key, "live")
    time.sleep(0.005)
    assert throttle.renew_connections("site", ["live", "dying", "never-leased"]) == ["dying", "never-leased"]
    assert client.zscore(key, "live") > before
    assert client.zscore(key, "dying") is None
    assert throttle.state("site").connections == 1
    assert throttle.lease_connection(site, "new") is True
    assert throttle.lease_connection(site, "one-too-many") is False  # the renewed lease still counts
    assert throttle.renew_connections("site", []) == []


# --- counters and state -------------------------------------------------------------------------


def test_counters_add_up_per_site(throttle):
    throttle.count({"google": {"sent": 3, "failed": 1}, "yahoo": {"sent": 2}})
    throttle.count({"google": {"sent": 2, "throttled": 4}})
    throttle.count({})
    assert throttle.state("google").counters == {"sent": 5, "failed": 1, "throttled": 4}
    assert throttle.state("yahoo").counters == {"sent": 2}
    assert set(COUNTERS) >= {"sent", "failed", "throttled"}


def test_the_state_of_an_untouched_site_is_empty(throttle):
    state = throttle.state("nobody")
    assert (state.slowed_rate, state.slowed_for, state.suspended_for, state.suspended_reason) == (None,) * 4
    assert (state.connections, state.counters) == (0, {})


def test_the_state_shows_a_suspension_with_its_reason_and_time_left(throttle):
    site = make_site(10)
    throttle.apply_rule(site, suspend_rule(duration=120), "421 4.7.0 blocked " + "x" * 1000)
    state = throttle.state("site")
    assert 119 < state.suspended_for <= 120
    assert state.suspended_reason.startswith("421 4.7.0 blocked") and len(state.suspended_reason) == 500
    throttle.apply_rule(site, slow_rule(factor=0.5, duration=300), "421 slow")
    state = throttle.state("site")
    assert state.slowed_rate == pytest.approx(5) and 299 < state.slowed_for <= 300


def test_known_sites_lists_sites_with_any_state(throttle):
    throttle.acquire(make_site(10, name="a"), 1, now_us=0)
    throttle.count({"b": {"sent": 1}})
    throttle.lease_connection(make_site(None, name="c.example"), "x")
    assert throttle.known_sites() == {"a", "b", "c.example"}
