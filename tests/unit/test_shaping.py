"""The send path's traffic shaping: which site a domain belongs to (policy, MX), how many messages
may go now and when the rest come back, and what SMTP replies change for every worker."""

from __future__ import annotations

import itertools

import fakeredis
import pytest

from smartmail.workers.limiter import SiteThrottle
from smartmail.workers.outcomes import Reply, RetrySchedule
from smartmail.workers.policy import Policy, load_policy
from smartmail.workers.shaping import Hold, MxResolver, Shaper

POLICY = """
[mx]
enabled = true
timeout = 1.5
cache_seconds = 600

[default]
rate = "unlimited"

[[default.rules]]
match = '(?i)^4\\d\\d .*(rate limit|too many)'
action = "slow"
factor = 0.5
duration = "30m"

[[default.rules]]
match = '(?i)^554 .*blocked'
action = "suspend"
duration = "1h"

[sites.google]
domains = ["gmail.com"]
mx = ["google.com"]
rate = "600/min"
burst = 3

[[sites.google.rules]]
match = '^550 5\\.7\\.26 '
action = "bounce"

[[sites.google.rules]]
match = '^421 4\\.7\\.28 '
action = "slow"
rate = "2/s"
duration = "10m"

[sites.yahoo]
domains = ["yahoo.com"]
mx = ["yahoodns.net"]
rate = "1200/min"
burst = 5
"""


@pytest.fixture
def policy(tmp_path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    return load_policy(path, RetrySchedule())


@pytest.fixture
def client():
    return fakeredis.FakeRedis()


@pytest.fixture
def throttle(client):
    return SiteThrottle(client, prefix="shape:")


class FakeLookup:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, float]] = []

    def __call__(self, domain: str, timeout: float) -> list[str]:
        self.calls.append((domain, timeout))
        if domain not in self.answers:
            raise OSError(f"NXDOMAIN {domain}")
        return self.answers[domain]


@pytest.fixture
def lookup():
    return FakeLookup(
        {
            "corp.example": ["alt1.aspmx.l.google.com", "aspmx.l.google.com"],
            "shop.example": ["mx.shop.example"],
            "evil.example": ["mx.evilgoogle.com"],
            "mixed.example": ["mx.shop.example", "mta7.am0.yahoodns.net"],
        }
    )


@pytest.fixture
def shaper(throttle, policy, lookup):
    return Shaper(throttle, policy=lambda: policy, resolver=MxResolver(timeout=1.5, cache_seconds=600, lookup=lookup))


# --- site_for -----------------------------------------------------------------------------------


def test_a_listed_domain_is_its_site_without_an_mx_lookup(shaper, lookup):
    assert shaper.site_for("gmail.com").name == "google"
    assert shaper.site_for("GMail.COM.").name == "google"
    assert lookup.calls == []


def test_an_unknown_domain_rolls_into_a_site_by_mx(shaper, lookup):
    site = shaper.site_for("Corp.Example")
    assert site.name == "google" and site.rate == pytest.approx(10.0)
    assert lookup.calls == [("corp.example", 1.5)]  # lower-cased, with the policy's timeout
    assert shaper.site_for("mixed.example").name == "yahoo"


def test_an_mx_outside_every_site_leaves_the_domain_a_site_of_its_own(shaper):
    site = shaper.site_for("shop.example")
    assert site.name == "shop.example" and site.rate is None
    assert shaper.site_for("evil.example").name == "evil.example"  # evilgoogle.com is not google.com


def test_a_failed_lookup_leaves_the_domain_a_site_of_its_own(shaper, lookup, policy):
    site = shaper.site_for("nowhere.example")
    assert site.name == "nowhere.example"
    assert (site.rate, site.rules) == (policy.default.rate, policy.default.rules)
    assert lookup.calls == [("nowhere.example", 1.5)]


def test_mx_answers_are_cached(shaper, lookup):
    for _ in range(3):
        assert shaper.site_for("corp.example").name == "google"
        assert shaper.site_for("nowhere.example").name == "nowhere.example"  # failures are cached too
    assert sorted(lookup.calls) == [("corp.example", 1.5), ("nowhere.example", 1.5)]


def test_the_resolver_caches_per_domain_and_for_cache_seconds_only(lookup):
    resolver = MxResolver(timeout=1.5, cache_seconds=600, lookup=lookup)
    assert resolver("corp.example") == ["alt1.aspmx.l.google.com", "aspmx.l.google.com"]
    assert resolver("corp.example") == ["alt1.aspmx.l.google.com", "aspmx.l.google.com"]
    assert resolver("shop.example") == ["mx.shop.example"]
    assert resolver("nowhere.example") == []
    assert resolver("nowhere.example") == []
    assert [d for d, _ in lookup.calls] == ["corp.example", "shop.example", "nowhere.example"]
    uncached = MxResolver(timeout=1.5, cache_seconds=0, lookup=lookup)
    uncached("corp.example")
    uncached("corp.example")
    assert [d for d, _ in lookup.calls].count("corp.example") == 3


def test_no_mx_lookups_when_they_are_off(tmp_path, throttle, lookup):
    path = tmp_path / "off.toml"
    path.write_text(POLICY.replace("enabled = true", "enabled = false"), encoding="utf-8")
    policy = load_policy(path, RetrySchedule())
    shaper = Shaper(throttle, policy=lambda: policy, resolver=MxResolver(timeout=1.5, lookup=lookup))
    assert shaper.site_for("corp.example").name == "corp.example"
    assert lookup.calls == []


# --- admit --------------------------------------------------------------------------------------


def test_admit_grants_the_burst_and_holds_the_rest_one_interval_apart(shaper, policy):
    google = policy.sites["google"]  # 10/s, burst 3
    granted, holds = shaper.admit(google, 8)
    assert granted == 3 and len(holds) == 5
    seconds = [hold.seconds for hold in holds]
    assert seconds[0] == pytest.approx(0.1, abs=0.01)
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(seconds))
    assert {hold.reason for hold in holds} == {"throttled: site google at 10/s"}


def test_successive_admits_queue_their_holds_behind_each_other(shaper, policy):
    google = policy.sites["google"]
    _, first = shaper.admit(google, 5)  # 3 go, holds at ~0.1, ~0.2
    granted, second = shaper.admit(google, 2)
    assert granted == 0
    assert second[0].seconds == pytest.approx(first[-1].seconds + 0.1, abs=0.01)
    assert second[1].seconds - second[0].seconds == pytest.approx(0.1)


def test_admit_lets_everything_through_to_an_unlimited_site(shaper):
    site = shaper.site_for("shop.example")
    assert shaper.admit(site, 250) == (250, [])


def test_admit_on_a_suspended_site_holds_everything_for_the_suspension(shaper, policy, throttle):
    yahoo = policy.sites["yahoo"]
    reply = Reply(554, "5.7.1 Service unavailable; client host blocked")
    assert shaper.react(yahoo, reply, set()) is None
    granted, holds = shaper.admit(yahoo, 4)
    assert granted == 0 and len(holds) == 4
    assert all(hold.reason == "site yahoo suspended" for hold in holds)
    assert all(3590 < hold.seconds <= 3600 for hold in holds)
    assert throttle.state("yahoo").suspended_reason == str(reply)


def test_admit_of_nothing_holds_nothing(shaper, policy):
    assert shaper.admit(policy.sites["google"], 0) == (0, [])


def test_connection_hold_is_short_and_names_the_limit(policy):
    hold = Shaper.connection_hold(policy.sites["yahoo"])
    assert isinstance(hold, Hold) and 0.05 <= hold.seconds <= 0.3  # back within the holder's grace
    assert hold.reason == "throttled: site yahoo at 20 connections"


# --- react --------------------------------------------------------------------------------------


class CountingThrottle(SiteThrottle):
    def __init__(self, client) -> None:
        super().__init__(client, prefix="count:")
        self.applied: list[tuple[str, str, bool]] = []

    def apply_rule(self, site, rule, reply_text):
        changed = super().apply_rule(site, rule, reply_text)
        self.applied.append((site.name, rule.action, changed.changed))
        return changed


@pytest.fixture
def counting(client, policy):
    throttle = CountingThrottle(client)
    return throttle, Shaper(throttle, policy=lambda: policy)


def test_a_bounce_rule_bounces_the_message_and_changes_nothing(counting, policy, client):
    throttle, shaper = counting
    reply = Reply(550, "5.7.26 Unauthenticated email from example.com is not accepted")
    assert shaper.react(policy.sites["google"], reply, set()) == "bounce"
    assert shaper.react(policy.sites["google"], reply, {"google"}) == "bounce"  # per message, always
    assert throttle.applied == [] and client.keys("*") == []


def test_a_slow_rule_arms_once_per_site_and_window(counting, policy):
    throttle, shaper = counting
    google = policy.sites["google"]
    reply = Reply(421, "4.7.28 Our system has detected an unusual rate of unsolicited mail")
    reacted: set[str] = set()
    assert shaper.react(google, reply, reacted) is None
    assert shaper.react(google, reply, reacted) is None
    assert throttle.applied == [("google", "slow", True)]
    assert reacted == {"google"}
    assert throttle.state("google").slowed_rate == pytest.approx(2.0)
    shaper.react(google, reply, set())  # a new window: one more call, which changes nothing
    assert throttle.applied == [("google", "slow", True), ("google", "slow", False)]


def test_a_slowed_site_is_admitted_at_the_slower_pace(counting, policy):
    _, shaper = counting
    google = policy.sites["google"]
    shaper.react(google, Reply(421, "4.7.28 unusual rate"), set())
    granted, holds = shaper.admit(google, 6)
    assert granted == 3
    assert holds[0].reason == "throttled: site google at 2/s"
    assert holds[1].seconds - holds[0].seconds == pytest.approx(0.5)


def test_a_suspend_rule_arms_once_per_site_and_window(counting, policy):
    throttle, shaper = counting
    reacted: set[str] = set()
    for site_name in ("google", "yahoo", "google", "yahoo"):
        assert shaper.react(policy.sites[site_name], Reply(554, "5.7.1 blocked"), reacted) is None
    assert throttle.applied == [("google", "suspend", True), ("yahoo", "suspend", True)]
    assert throttle.state("google").suspended_for > 3590 and throttle.state("yahoo").suspended_for > 3590


def test_a_site_already_acted_on_is_not_touched_again_in_the_window(counting, policy):
    throttle, shaper = counting
    reacted = {"google"}
    assert shaper.react(policy.sites["google"], Reply(554, "5.7.1 blocked"), reacted) is None
    assert throttle.applied == [] and throttle.state("google").suspended_for is None


def test_a_reply_that_matches_no_rule_changes_nothing(counting, policy, client):
    throttle, shaper = counting
    reacted: set[str] = set()
    for reply in (Reply(250, "2.0.0 OK"), Reply(550, "5.1.1 user unknown"), Reply(None, "connection reset")):
        assert shaper.react(policy.sites["google"], reply, reacted) is None
    assert reacted == set() and throttle.applied == [] and client.keys("*") == []


def test_a_factor_rule_on_an_unlimited_site_is_a_no_op(counting, policy, client):
    throttle, shaper = counting
    site = policy.unknown_site("shop.example")
    assert shaper.react(site, Reply(451, "4.7.1 Too many messages, rate limit exceeded"), set()) is None
    assert throttle.applied == [("shop.example", "slow", False)]
    assert client.keys("*") == []
