"""Machine opens and clicks: the shipped sources (privacy proxies, scanners, gateways), the timing
rules, bursts of clicks, and the data file's own checks."""

from __future__ import annotations

import ipaddress
import re
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartmail.config.settings import Settings
from smartmail.feedback.machine import (
    HEAD_REQUEST,
    NO_USER_AGENT,
    SOURCES_FILE,
    TOO_SOON,
    _address,
    burst_clicks,
    burst_is_machine,
    click_machine_reason,
    open_machine_reason,
    parse_sources,
)

# User agents as the clients send them.
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
)
SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15"
)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
OUTLOOK_DESKTOP = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.9.0"
CUBOT_PHONE = (  # a phone maker whose name ends in "bot"
    "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0 Mobile Safari/537.36"
)
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
HOME = "203.0.113.77"  # TEST-NET-3: nobody's proxy
HOME_V6 = "2001:db8:5:6::7"


def click(user_agent, ip=HOME, method="GET", after=600.0, threshold=10.0):
    return click_machine_reason(user_agent, ip, method, after, threshold)


# --- opens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent", [IPHONE_MAIL, SAFARI, CHROME, OUTLOOK_DESKTOP, THUNDERBIRD, CUBOT_PHONE])
@pytest.mark.parametrize("ip", [HOME, HOME_V6, None, "not an address"])
def test_a_reader_s_own_client_opens_as_a_person(agent, ip):
    assert open_machine_reason(agent, ip) is None


@pytest.mark.parametrize(
    ("agent", "ip", "reason"),
    [
        ("Mozilla/5.0", HOME, "apple-mail-privacy-protection"),  # from a Private Relay egress: the bare agent says it
        (" Mozilla/5.0 ", None, "apple-mail-privacy-protection"),
        (IPHONE_MAIL, "17.58.101.9", "apple-mail-privacy-protection"),  # Apple's own network
        (IPHONE_MAIL, "::ffff:17.58.101.9", "apple-mail-privacy-protection"),  # as a dual-stack socket reports it
        (GMAIL_PROXY, "66.249.84.1", "google-image-proxy"),
        (YAHOO_PROXY, "98.136.1.1", "yahoo-mail-proxy"),
        (CHROME, "40.107.22.33", "microsoft-365-protection"),  # Exchange Online Protection fetches pixels too
        (CHROME, "2a01:111:f403:c000::1", "microsoft-365-protection"),
        ("python-requests/2.31.0", HOME, "http-library"),
        ("", HOME, NO_USER_AGENT),
        (None, HOME, NO_USER_AGENT),
        ("   ", HOME, NO_USER_AGENT),
    ],
)
def test_privacy_proxies_and_scanners_open_as_machines(agent, ip, reason):
    assert open_machine_reason(agent, ip) == reason


def test_apple_s_network_alone_does_not_flag_a_click():
    """Apple's relays prefetch images; a click from Apple's network is a person's browser (the
    bare agent of the prefetch is still not a browser's, though)."""
    assert click(SAFARI, ip="17.58.101.9") is None
    assert click(GMAIL_PROXY) is None  # the image proxy never follows links


# --- clicks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent", [IPHONE_MAIL, SAFARI, CHROME, THUNDERBIRD, CUBOT_PHONE])
def test_a_person_s_browser_clicks_as_a_person(agent):
    assert click(agent) is None
    assert click(agent, ip=HOME_V6) is None


@pytest.mark.parametrize(
    ("agent", "reason"),
    [
        ("python-requests/2.31.0", "http-library"),
        ("curl/8.5.0", "http-library"),
        ("Go-http-client/1.1", "http-library"),
        ("Wget/1.21.4", "http-library"),
        ("Apache-HttpClient/4.5.14 (Java/17.0.9)", "http-library"),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/124.0.0.0 Safari/537.36",
            "headless-browser",
        ),
        ("Microsoft Office Existence Discovery", "microsoft-link-check"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; Trident/7.0; BingPreview/1.0b)", "microsoft-link-check"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "crawler"),
        ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "crawler"),
        ("BarracudaCentral/1.0", "security-gateway"),
        ("Mimecast URL Protect", "security-gateway"),
        ("", NO_USER_AGENT),
        (None, NO_USER_AGENT),
        (YAHOO_PROXY, "yahoo-mail-proxy"),
        ("Mozilla/5.0", "bare-user-agent"),
    ],
)
def test_scanners_and_libraries_click_as_machines(agent, reason):
    assert click(agent) == reason


def test_a_head_request_is_a_link_check():
    assert click(CHROME, method="HEAD") == HEAD_REQUEST
    assert click(CHROME, method="head") == HEAD_REQUEST


@pytest.mark.parametrize("ip", ["40.92.1.1", "40.93.255.254", "52.103.0.1", "104.47.127.1", "2a01:111:f400:7e00::9"])
def test_exchange_online_protection_clicks_are_machines(ip):
    assert click(CHROME, ip=ip) == "microsoft-365-protection"


@pytest.mark.parametrize("ip", ["40.94.0.1", "52.96.0.1", "104.47.128.1", "2a01:111:f401::1"])
def test_neighbouring_microsoft_networks_are_not(ip):
    """Outlook on the web and the rest of Microsoft's cloud carry people: only EOP is listed."""
    assert click(CHROME, ip=ip) is None


def test_a_click_right_after_delivery_is_a_scanner_s():
    assert click(CHROME, after=2.5, threshold=10) == TOO_SOON
    assert click(CHROME, after=-1.0, threshold=10) == TOO_SOON  # clocks apart: still before any reader
    assert click(CHROME, after=10.0, threshold=10) is None
    assert click(CHROME, after=None, threshold=10) is None  # sent time unknown: no timing verdict
    assert click(CHROME, after=2.5, threshold=0) is None  # the rule off


def test_the_source_wins_over_timing():
    assert click("curl/8.5.0", after=1.0) == "http-library"


# --- bursts ------------------------------------------------------------------------------------


def test_many_links_in_a_moment_are_a_burst():
    clicks = [(100.0, 1), (100.4, 2), (101.1, 3), (3000.0, 2)]  # a scanner, then the reader an hour on
    assert burst_clicks(clicks, burst_links=3, burst_seconds=2.0) == [True, True, True, False]
    assert burst_is_machine(clicks, 3, 2.0)


def test_a_person_clicking_two_links_or_slowly_is_not():
    assert not burst_is_machine([(100.0, 1), (100.5, 2)], 3, 2.0)
    assert not burst_is_machine([(100.0, 1), (101.5, 2), (103.0, 3)], 3, 2.0)  # 3 s apart end to end
    assert not burst_is_machine([(100.0, 1), (100.1, 1), (100.2, 1), (100.3, 2)], 3, 2.0)  # repeats are one link
    assert not burst_is_machine([], 3, 2.0)


def test_burst_answers_in_the_order_given():
    clicks = [(5000.0, 9), (101.1, 3), (100.0, 1), (100.4, 2)]
    assert burst_clicks(clicks, 3, 2.0) == [False, True, True, True]


def _burst_brute_force(clicks, links, seconds):
    flagged = [False] * len(clicks)
    for end, _ in clicks:
        inside = [i for i, (at, _) in enumerate(clicks) if end - seconds <= at <= end]
        if len({clicks[i][1] for i in inside}) >= links:
            for i in inside:
                flagged[i] = True
    return flagged


@given(
    st.lists(st.tuples(st.integers(0, 40).map(lambda t: t / 4), st.integers(1, 5)), max_size=25),
    st.integers(2, 4),
    st.sampled_from([0.0, 0.5, 2.0, 3.0]),
)
def test_burst_matches_its_definition(clicks, links, seconds):
    assert burst_clicks(clicks, links, seconds) == _burst_brute_force(clicks, links, seconds)


# --- the data file -----------------------------------------------------------------------------


def _shipped() -> dict:
    with SOURCES_FILE.open("rb") as file:
        return tomllib.load(file)


def test_every_shipped_source_cites_where_it_is_documented():
    blocks = re.split(r"^\[\[source\]\]$", SOURCES_FILE.read_text(encoding="utf-8"), flags=re.M)
    for before, entry in zip(blocks, _shipped()["source"]):
        comment = [line for line in before.strip().splitlines() if line.startswith("#")]
        assert any("http" in line for line in comment[-12:]), f"{entry['reason']}: no cited document above it"


def test_shipped_networks_still_match_truncated_addresses():
    """Events store addresses truncated (/24, /48 by default): every shipped network is at least
    that wide, so a stored address can be judged again (say, after the data file changes)."""
    defaults = Settings.model_fields
    v4, v6 = defaults["tracking_ip_prefix_v4"].default, defaults["tracking_ip_prefix_v6"].default
    for entry in _shipped()["source"]:
        for text in entry.get("networks", []):
            network = ipaddress.ip_network(text)
            assert network.prefixlen <= (v4 if network.version == 4 else v6), text


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "source"),
        ({"source": [{"reason": "x", "applies_to": ["open"], "agents": ["a"]}]}, "source[0].agents"),
        ({"source": [{"applies_to": ["open"]}]}, "source[0].reason"),
        ({"source": [{"reason": "x", "applies_to": ["send"]}]}, "source[0].applies_to"),
        ({"source": [{"reason": "x", "applies_to": []}]}, "source[0].applies_to"),
        ({"source": [{"reason": "x", "applies_to": ["open"], "networks": ["17.0.0.1/8"]}]}, "source[0].networks"),
        ({"source": [{"reason": "x", "applies_to": ["open"], "user_agents": [""]}]}, "source[0].user_agents"),
        ({"source": [{"reason": "x", "applies_to": ["open"], "user_agents": "curl/"}]}, "source[0].user_agents"),
    ],
)
def test_a_malformed_source_names_its_field(data, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        parse_sources(data)


def test_nested_networks_match_the_outer_block():
    rules = parse_sources(
        {
            "source": [
                {"reason": "inner", "applies_to": ["open"], "networks": ["10.1.0.0/16"]},
                {"reason": "outer", "applies_to": ["open"], "networks": ["10.0.0.0/8", "192.0.2.0/24"]},
            ]
        }
    )["open"]
    assert rules.network_reason("10.200.0.1") == "outer"
    assert rules.network_reason("10.1.2.3") == "outer"  # inside both: the outer block kept
    assert rules.network_reason("192.0.2.255") == "outer"
    assert rules.network_reason("192.0.3.0") is None
    assert rules.network_reason("9.255.255.255") is None


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_addresses_are_read_as_ipaddress_reads_them(address):
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        expected = (4, int(address.ipv4_mapped))
    else:
        expected = (address.version, int(address))
    assert _address(str(address)) == expected
    assert _address(address.exploded) == expected


@given(st.text(max_size=45))
def test_text_that_is_no_address_matches_no_network(text):
    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        assert _address(text) is None
