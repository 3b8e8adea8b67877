"""The traffic-shaping policy: rate and duration syntax, loading and inheritance, errors that name
the file and the key, hot reload, and the look-ups the send path makes (rules, sites by domain/MX)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from smartmail.workers.outcomes import Reply, RetrySchedule
from smartmail.workers.policy import (
    DEFAULT_POLICY_FILE,
    DEFAULT_RECOVER_AFTER,
    DEFAULT_RECOVER_STEP,
    Policy,
    PolicyError,
    PolicyStore,
    Rule,
    Site,
    load_policy,
    parse_duration,
    parse_rate,
)

DEFAULTS = RetrySchedule(first_interval=11.0, backoff_factor=3.0, max_interval=77.0, jitter=0.05, max_age=999.0)


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Policy:
    return load_policy(write(tmp_path, text), DEFAULTS)


def policy_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path, DEFAULTS)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # the file is named first
    return message


# --- parse_rate / parse_duration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100/s", 100.0),
        ("3000/min", 50.0),
        ("50/h", 50 / 3600),
        ("1.5/s", 1.5),
        (" 20 / second ", 20.0),
        ("120/minute", 2.0),
        ("7200/hour", 2.0),
        ("10/sec", 10.0),
        ("60/m", 1.0),
        ("unlimited", None),
        ("Unlimited ", None),
    ],
)
def test_parse_rate_accepts(value, expected):
    result = parse_rate(value)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", ["fast", "0/s", "0.0/min", "-1/s", 5, 5.0, "10/day", "10", "/s", "1e3/s", "", None, True]
)
def test_parse_rate_rejects(value):
    with pytest.raises(ValueError, match="expected a rate"):
        parse_rate(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (0, 0.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("3d", 259_200.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration_accepts(value, expected):
    assert parse_duration(value) == pytest.approx(expected)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value", ["soon", -1, -0.5, True, False, "-5s", "5 weeks", "5y", "", None, [30]])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


# --- loading ------------------------------------------------------------------------------------


def test_the_shipped_policy_loads():
    policy = load_policy(DEFAULT_POLICY_FILE, DEFAULTS)
    assert set(policy.sites) == {"google", "microsoft", "yahoo"}
    google = policy.sites["google"]
    assert google.rate == pytest.approx(50.0)  # 3000/min
    assert (google.burst, google.max_connections, google.max_messages_per_connection) == (100, 10, 100)
    assert google.retry == DEFAULTS  # nothing in the file sets retries
    assert policy.default.rate is None and policy.default.name == "default"
    assert policy.default.burst == 1 and policy.default.max_connections == 20
    assert policy.domains["gmail.com"] == "google" and policy.domains["aol.com"] == "yahoo"
    assert policy.mx.enabled is False and policy.mx.timeout == 2.0 and policy.mx.cache_seconds == 3600
    assert len(policy.default.rules) == 2 and len(google.rules) == 2
    assert [r.action for r in policy.sites["yahoo"].rules] == ["suspend", "slow", "suspend"]
    assert policy.sites["yahoo"].rules[0].duration == 900.0


def test_a_copy_of_the_shipped_policy_loads_from_anywhere(tmp_path):
    path = write(tmp_path, DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    assert load_policy(path, DEFAULTS) == load_policy(DEFAULT_POLICY_FILE, DEFAULTS)


def test_an_empty_policy_is_all_defaults(tmp_path):
    policy = load(tmp_path, "")
    assert policy.sites == {} and policy.domains == {} and policy.mx_suffixes == ()
    assert policy.default == Site("default", None, 1, 20, 100, DEFAULTS, ())


def test_sites_inherit_from_default_then_from_the_built_in_defaults(tmp_path):
    policy = load(
        tmp_path,
        """
        [default]
        rate = "10/s"
        burst = 4
        max_connections = 3
        [default.retry]
        first_interval = "30s"
        jitter = 0.5

        [sites.own]
        rate = "100/s"
        max_messages_per_connection = 7
        [sites.own.retry]
        max_interval = "2h"
        jitter = 0.1

        [sites.bare]
    """,
    )
    own, bare = policy.sites["own"], policy.sites["bare"]
    assert (own.rate, own.burst, own.max_connections, own.max_messages_per_connection) == (100.0, 4, 3, 7)
    assert own.retry == RetrySchedule(
        first_interval=30.0, backoff_factor=3.0, max_interval=7200.0, jitter=0.1, max_age=999.0
    )
    assert (bare.rate, bare.burst, bare.max_connections, bare.max_messages_per_connection) == (10.0, 4, 3, 100)
    assert bare.retry == RetrySchedule(
        first_interval=30.0, backoff_factor=3.0, max_interval=77.0, jitter=0.5, max_age=999.0
    )
    assert policy.default.retry == bare.retry


def test_burst_defaults_to_one_second_of_the_rate(tmp_path):
    policy = load(
        tmp_path,
        """
        [sites.fast]
        rate = "50/s"
        [sites.slow]
        rate = "30/min"
        [sites.open]
        rate = "unlimited"
    """,
    )
    assert [policy.sites[name].burst for name in ("fast", "slow", "open")] == [50, 1, 1]


def test_a_site_can_be_unlimited_under_a_limited_default(tmp_path):
    policy = load(
        tmp_path,
        """
        [default]
        rate = "10/s"
        [sites.open]
        rate = "unlimited"
    """,
    )
    assert policy.sites["open"].rate is None and policy.default.rate == 10.0


def test_site_rules_come_before_the_default_rules(tmp_path):
    policy = load(
        tmp_path,
        """
        [[default.rules]]
        match = "^4"
        action = "slow"
        factor = 0.5

        [[sites.x.rules]]
        match = "^421"
        action = "suspend"
        duration = "5m"
        [[sites.x.rules]]
        match = "^550 5\\\\.7"
        action = "bounce"
    """,
    )
    x = policy.sites["x"]
    assert [(r.pattern.pattern, r.action) for r in x.rules] == [
        ("^421", "suspend"),
        (r"^550 5\.7", "bounce"),
        ("^4", "slow"),
    ]
    assert x.rules[0].duration == 300.0 and x.rules[2].duration == 1800.0  # the rule default: 30 minutes
    assert [r.action for r in policy.default.rules] == ["slow"]  # the default's own rules once only


def test_a_slow_rule_rate_is_parsed(tmp_path):
    policy = load(
        tmp_path,
        """
        [[sites.x.rules]]
        match = "^4"
        action = "slow"
        rate = "120/min"
    """,
    )
    rule = policy.sites["x"].rules[0]
    assert (rule.rate, rule.factor) == (2.0, None)


def test_a_slow_rule_recovers_a_tenth_every_two_quiet_minutes_unless_told(tmp_path):
    policy = load(
        tmp_path,
        """
        [[sites.x.rules]]
        match = "^4"
        action = "slow"
        factor = 0.5
        [[sites.x.rules]]
        match = "^421"
        action = "slow"
        factor = 0.5
        recover_after = "30s"
        recover_step = 0.25
        [[sites.x.rules]]
        match = "^451"
        action = "slow"
        rate = "1/s"
        recover_after = 90
        recover_step = 0
    """,
    )
    rules = policy.sites["x"].rules
    assert [(r.recover_after, r.recover_step) for r in rules] == [(120.0, 0.1), (30.0, 0.25), (90.0, 0.0)]
    assert (DEFAULT_RECOVER_AFTER, DEFAULT_RECOVER_STEP) == (120.0, 0.1)


def test_domains_and_mx_suffixes_are_lower_cased(tmp_path):
    policy = load(
        tmp_path,
        """
        [sites.big]
        domains = ["Example.COM", " Mail.Example.Org. "]
        mx = ["MX.Example.NET."]
    """,
    )
    assert policy.domains == {"example.com": "big", "mail.example.org": "big"}
    assert policy.mx_suffixes == (("mx.example.net", "big"),)


def test_mx_suffixes_are_sorted_longest_first(tmp_path):
    policy = load(
        tmp_path,
        """
        [sites.short]
        mx = ["example.net"]
        [sites.long]
        mx = ["eu.example.net", "z.net"]
        [sites.longest]
        mx = ["mx.eu.example.net"]
    """,
    )
    assert policy.mx_suffixes == (
        ("mx.eu.example.net", "longest"),
        ("eu.example.net", "long"),
        ("example.net", "short"),
        ("z.net", "long"),
    )


def test_mx_options_are_read(tmp_path):
    policy = load(
        tmp_path,
        """
        [mx]
        enabled = true
        timeout = 0.5
        cache_seconds = 60
    """,
    )
    assert (policy.mx.enabled, policy.mx.timeout, policy.mx.cache_seconds) == (True, 0.5, 60)


# --- malformed policies name the file and the key -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ('[sites.google]\nrate = "fast"\n', "sites.google.rate", "expected a rate"),
        ("[sites.google]\nrate = 100\n", "sites.google.rate", "expected a rate"),
        ('[sites.google]\nrate = "0/s"\n', "sites.google.rate", "expected a rate"),
        ("[default.retry]\njitter = 2\n", "default.retry.jitter", "less than or equal to 1"),
        ("[default.retry]\nbackoff_factor = 0.5\n", "default.retry.backoff_factor", "greater than or equal to 1"),
        ('[sites.x.retry]\nmax_age = "soon"\n', "sites.x.retry.max_age", "expected a duration"),
        (
            '[[sites.x.rules]]\nmatch = "("\naction = "suspend"\n',
            "sites.x.rules[0].match",
            "not a valid regular expression",
        ),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "slow"\nrate = "1/s"\nfactor = 0.5\n',
            "sites.x.rules[0]",
            "exactly one of rate or factor",
        ),
        ('[[sites.x.rules]]\nmatch = "a"\naction = "slow"\n', "sites.x.rules[0]", "exactly one of rate or factor"),
        ('[[sites.x.rules]]\nmatch = "a"\naction = "slow"\nfactor = 1.5\n', "sites.x.rules[0].factor", "less than 1"),
        ('[[sites.x.rules]]\nmatch = "a"\naction = "explode"\n', "sites.x.rules[0].action", "'bounce'"),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "suspend"\nduration = "soon"\n',
            "sites.x.rules[0].duration",
            "expected a duration",
        ),
        ('[[sites.x.rules]]\naction = "suspend"\n', "sites.x.rules[0].match", "Field required"),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "slow"\nfactor = 0.5\nrecover_after = "soon"\n',
            "sites.x.rules[0].recover_after",
            "expected a duration",
        ),
        (
            '[[default.rules]]\nmatch = "a"\naction = "slow"\nfactor = 0.5\nrecover_after = 0\n',
            "default.rules[0].recover_after",
            "longer than 0",
        ),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "slow"\nfactor = 0.5\nrecover_step = 1.5\n',
            "sites.x.rules[0].recover_step",
            "less than or equal to 1",
        ),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "slow"\nfactor = 0.5\nrecover_step = -0.1\n',
            "sites.x.rules[0].recover_step",
            "greater than or equal to 0",
        ),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "suspend"\nrecover_after = "1m"\n',
            "sites.x.rules[0].recover_after",
            "only a slow rule recovers step by step, not a suspend rule",
        ),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "bounce"\nrecover_step = 0.2\n',
            "sites.x.rules[0].recover_step",
            "not a bounce rule",
        ),
        (
            '[[sites.x.rules]]\nmatch = "a"\naction = "slow"\nfactor = 0.5\nrecover_every = "1m"\n',
            "sites.x.rules[0].recover_every",
            "Extra inputs are not permitted",
        ),
        ("[sites.x]\nmax_conections = 3\n", "sites.x.max_conections", "Extra inputs are not permitted"),
        ("[sites.x]\nburst = 0\n", "sites.x.burst", "greater than or equal to 1"),
        ("[mx]\ntimeout = 0\n", "mx.timeout", "greater than 0"),
        ('[sitez.x]\nrate = "1/s"\n', "sitez", "Extra inputs are not permitted"),
        (
            '[sites.a]\ndomains = ["A.com"]\n[sites.b]\ndomains = ["a.com"]\n',
            "sites.b.domains",
            "'a.com' already belongs to site 'a'",
        ),
    ],
)
def test_a_malformed_policy_names_the_key(tmp_path, text, key, detail):
    message = policy_error(tmp_path, text)
    assert f": {key}: " in message, message
    assert detail in message, message


def test_every_problem_is_reported_at_once(tmp_path):
    message = policy_error(tmp_path, '[sites.a]\nrate = "fast"\nburst = 0\n[sites.b]\nmax_conections = 1\n')
    for key in ("sites.a.rate", "sites.a.burst", "sites.b.max_conections"):
        assert key in message, message


@pytest.mark.parametrize("name", ["literalmail", "function-mail"])
def test_the_key_path_keeps_every_site_name(tmp_path, name):
    # The filter that drops pydantic's union-branch labels must not drop a site whose name looks like one.
    message = policy_error(tmp_path, f'[sites.{name}]\nrate = "fast"\n')
    assert f"sites.{name}.rate" in message, message


def test_invalid_toml_is_a_policy_error(tmp_path):
    message = policy_error(tmp_path, "[sites.a\nrate = 1\n")
    assert "not valid TOML" in message and "line 1" in message


def test_a_file_that_is_not_utf8_is_a_policy_error(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_bytes(b'[sites.a]\nrate = "\xff\xfe"\n')
    with pytest.raises(PolicyError, match=re.escape(str(path))):
        load_policy(path, DEFAULTS)


def test_a_missing_file_is_a_policy_error(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load_policy(path, DEFAULTS)
    assert str(info.value).startswith(f"{path}: cannot read the policy file")


# --- hot reload ---------------------------------------------------------------------------------


def _rewrite(path: Path, text: str, bump_ns: int) -> None:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump_ns))  # a new mtime even on a coarse clock


def test_the_store_reloads_an_edited_file(tmp_path):
    path = write(tmp_path, '[sites.a]\nrate = "10/s"\n')
    store = PolicyStore(path, DEFAULTS, check_interval=0)
    assert store.get().sites["a"].rate == 10.0
    assert store.get() is store.get()  # unchanged file: the same policy object
    _rewrite(path, '[sites.a]\nrate = "200/s"\n[sites.b]\ndomains = ["b.example"]\n', 1_000_000_000)
    policy = store.get()
    assert policy.sites["a"].rate == 200.0 and policy.site_for_domain("b.example").name == "b"


def test_a_broken_edit_keeps_the_last_good_policy(tmp_path):
    path = write(tmp_path, '[sites.a]\nrate = "10/s"\n')
    store = PolicyStore(path, DEFAULTS, check_interval=0)
    good = store.get()
    _rewrite(path, '[sites.a]\nrate = "very fast"\n', 1_000_000_000)
    assert store.get() is good
    _rewrite(path, "[sites.a\n", 2_000_000_000)
    assert store.get() is good
    path.unlink()
    assert store.get() is good
    _rewrite(path, '[sites.a]\nrate = "20/s"\n', 3_000_000_000)
    assert store.get().sites["a"].rate == 20.0  # fixed: picked up


def test_the_store_checks_the_file_at_most_every_check_interval(tmp_path):
    path = write(tmp_path, '[sites.a]\nrate = "10/s"\n')
    store = PolicyStore(path, DEFAULTS, check_interval=3600)
    _rewrite(path, '[sites.a]\nrate = "200/s"\n', 1_000_000_000)
    assert store.get().sites["a"].rate == 10.0


def test_the_store_refuses_to_start_with_a_broken_file(tmp_path):
    with pytest.raises(PolicyError, match="sites.a.rate"):
        PolicyStore(write(tmp_path, '[sites.a]\nrate = "x"\n'), DEFAULTS)


# --- rules --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return load_policy(DEFAULT_POLICY_FILE, RetrySchedule())


def test_rules_match_on_code_and_text(shipped):
    slow, suspend = shipped.default.rules
    assert str(Reply(421, "4.7.0 Try again later")) == "421 4.7.0 Try again later"
    assert slow.matches(Reply(421, "4.7.0 Try again later"))
    assert slow.matches(
        Reply(
            450,
            "4.2.1 The user you are trying to contact is receiving mail at a rate that "
            "prevents additional messages from being delivered. RATE LIMIT",
        )
    )
    assert not slow.matches(Reply(550, "5.7.1 rate limit"))  # a 5xx is not a slow-down
    assert not slow.matches(Reply(None, "try again later"))  # no reply code at all
    assert suspend.matches(Reply(554, "5.7.1 Service unavailable; client host blocked using Spamhaus"))
    assert not suspend.matches(Reply(250, "2.0.0 Ok: queued, not blocked"))


def test_the_first_matching_rule_wins(shipped):
    yahoo = shipped.sites["yahoo"]
    reply = Reply(421, "4.7.0 [TS01] Messages from 192.0.2.1 temporarily deferred due to user complaints")
    assert yahoo.rules[1].matches(reply)  # the default slow rule matches too
    rule = yahoo.rule_for(reply)
    assert rule is yahoo.rules[0] and (rule.action, rule.duration) == ("suspend", 900.0)
    google_rule = shipped.sites["google"].rule_for(reply)
    assert google_rule.action == "slow" and google_rule.factor == 0.5


def test_a_reply_no_rule_matches_has_no_rule(shipped):
    assert shipped.sites["google"].rule_for(Reply(250, "2.0.0 OK")) is None
    assert shipped.sites["google"].rule_for(Reply(550, "5.1.1 user unknown")) is None
    assert Site("bare", None, 1, 1, 1, RetrySchedule()).rule_for(Reply(421, "too many")) is None


def _rule(rate=None, factor=None) -> Rule:
    return Rule(re.compile("^4"), "slow", rate, factor, 60.0)


@pytest.mark.parametrize(
    ("site_rate", "rule", "expected"),
    [
        (100.0, _rule(rate=10.0), 10.0),
        (5.0, _rule(rate=10.0), 5.0),  # a slow rule never speeds a site up
        (None, _rule(rate=10.0), 10.0),
        (100.0, _rule(factor=0.25), 25.0),
        (None, _rule(factor=0.25), None),  # a fraction of unlimited is nothing to apply
    ],
)
def test_slowed_rate(site_rate, rule, expected):
    assert Site("s", site_rate, 1, 1, 1, RetrySchedule()).slowed_rate(rule) == expected


# --- sites by domain and by MX ------------------------------------------------------------------


def test_site_for_domain(shipped):
    assert shipped.site_for_domain("gmail.com").name == "google"
    assert shipped.site_for_domain("hotmail.com").name == "microsoft"
    assert shipped.site_for_domain("example.org") is None
    assert shipped.site_for_domain("mail.gmail.com") is None  # domains are exact, not suffixes


def test_site_for_mx_matches_whole_labels_only(shipped):
    assert shipped.site_for_mx(["aspmx.l.google.com"]).name == "google"
    assert shipped.site_for_mx(["google.com"]).name == "google"
    assert shipped.site_for_mx(["mx1.mail.protection.outlook.com"]).name == "microsoft"
    assert shipped.site_for_mx(["mta5.am0.yahoodns.net"]).name == "yahoo"
    assert shipped.site_for_mx(["evilgoogle.com"]) is None
    assert shipped.site_for_mx(["mx.evilgoogle.com"]) is None
    assert shipped.site_for_mx(["google.com.evil.example"]) is None
    assert shipped.site_for_mx([]) is None


def test_site_for_mx_takes_the_first_host_that_matches(shipped):
    assert shipped.site_for_mx(["mx.example.org", "mta5.am0.yahoodns.net", "aspmx.l.google.com"]).name == "yahoo"


def test_site_for_mx_prefers_the_longest_suffix(tmp_path):
    policy = load(
        tmp_path,
        """
        [sites.all]
        mx = ["example.net"]
        [sites.eu]
        mx = ["eu.example.net"]
    """,
    )
    assert policy.site_for_mx(["mx1.eu.example.net"]).name == "eu"
    assert policy.site_for_mx(["mx1.us.example.net"]).name == "all"
    assert policy.site_for_mx(["mx1.neu.example.net"]).name == "all"


def test_an_unknown_domain_is_a_site_of_its_own_with_the_default_limits(tmp_path):
    policy = load(
        tmp_path,
        """
        [default]
        rate = "5/s"
        burst = 2
        max_connections = 4
        [[default.rules]]
        match = "^421"
        action = "suspend"
    """,
    )
    site = policy.unknown_site("example.org")
    assert site.name == "example.org"
    assert (site.rate, site.burst, site.max_connections, site.max_messages_per_connection) == (5.0, 2, 4, 100)
    assert site.rules == policy.default.rules and site.retry == DEFAULTS
    assert policy.default.name == "default"  # the default itself is untouched
