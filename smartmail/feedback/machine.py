"""Machine opens and clicks: privacy proxies, link scanners and security gateways, told apart from people.

Each function returns a short reason (stored on the event) or None for a person. Nothing is dropped:
an event with a reason is written with `machine: true`, and KPIs and segments leave it out by default.
The user agents and networks are data, in machine_sources.toml beside this module, each entry with
the document that describes it; they are loaded once per process.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import tomllib
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES_FILE = Path(__file__).with_name("machine_sources.toml")
_KINDS = ("open", "click")
_KEYS = {"reason", "applies_to", "user_agents", "exact_user_agents", "networks"}

# Reasons that come from the request or its timing rather than from a listed source.
NO_USER_AGENT = "no-user-agent"
HEAD_REQUEST = "head-request"
TOO_SOON = "clicked-right-after-delivery"
BURST = "many-links-at-once"
HONEYPOT = "honeypot-link"  # a click on the hidden link no person sees


class _Networks:
    """CIDR blocks of one IP version as sorted, non-overlapping integer ranges: a lookup is one bisect."""

    def __init__(self, blocks: Iterable[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]) -> None:
        # CIDR blocks either nest or are disjoint: keeping the outermost of each nest leaves disjoint ranges.
        ordered = sorted(((int(n.network_address), int(n.broadcast_address), r) for n, r in blocks), key=_widest_first)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.reasons: list[str] = []
        for start, end, reason in ordered:
            if self.ends and start <= self.ends[-1]:
                continue  # inside the block before it
            self.starts.append(start)
            self.ends.append(end)
            self.reasons.append(reason)

    def reason(self, address: int) -> str | None:
        at = bisect_right(self.starts, address) - 1
        if at >= 0 and address <= self.ends[at]:
            return self.reasons[at]
        return None


def _widest_first(item: tuple[int, int, str]) -> tuple[int, int]:
    return item[0], -item[1]


@dataclass(frozen=True)
class _Rules:
    """The sources that judge one kind of event (opens or clicks), ready for matching."""

    needles: tuple[tuple[str, str], ...]  # (lower-cased substring, reason)
    exact: dict[str, str]
    v4: _Networks
    v6: _Networks

    def reason(self, user_agent: str | None, ip: str | None) -> str | None:
        agent = (user_agent or "").strip()
        if not agent:
            return NO_USER_AGENT  # every mail client and browser sends one
        exact = self.exact.get(agent)
        if exact is not None:
            return exact
        lowered = agent.lower()
        # A loop of `in` tests over a lower-cased copy measured faster here than one alternation
        # regex with IGNORECASE (both find the same needles; the needles are a few dozen).
        for needle, reason in self.needles:
            if needle in lowered:
                return reason
        return self.network_reason(ip)

    def network_reason(self, ip: str | None) -> str | None:
        parsed = _address(ip)
        if parsed is None:
            return None
        version, address = parsed
        return (self.v4 if version == 4 else self.v6).reason(address)


_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6 addresses (RFC 4291 2.5.5.2)


def _address(ip: str | None) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer); an IPv4-mapped IPv6 address (what a dual-stack socket
    reports for an IPv4 client) as IPv4; None for anything else. inet_pton, not ipaddress: this runs
    per event, and it parses an address several times faster."""
    if not ip:
        return None
    ip = ip.strip()
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, ValueError):  # ValueError: a NUL in the text
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip)
    except (OSError, ValueError):  # ValueError: a NUL in the text
        return None  # not an address (or one with a zone index, which no public client has)
    if packed[:12] == _MAPPED:
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


def _strings(entry: dict[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError(f"{where}.{key}: expected a list of non-empty strings")
    return value


def parse_sources(data: dict[str, Any]) -> dict[str, _Rules]:
    """The rules for opens and for clicks from the parsed TOML; ValueError names the bad entry's field."""
    entries = data.get("source")
    if not isinstance(entries, list) or not entries:
        raise ValueError("source: expected [[source]] entries")
    needles: dict[str, list[tuple[str, str]]] = {kind: [] for kind in _KINDS}
    exact: dict[str, dict[str, str]] = {kind: {} for kind in _KINDS}
    v4: dict[str, list] = {kind: [] for kind in _KINDS}
    v6: dict[str, list] = {kind: [] for kind in _KINDS}
    for index, entry in enumerate(entries):
        where = f"source[{index}]"
        unknown = set(entry) - _KEYS
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key")
        reason = entry.get("reason")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"{where}.reason: expected a non-empty string")
        kinds = _strings(entry, "applies_to", where)
        if not kinds or not set(kinds) <= set(_KINDS):
            raise ValueError(f"{where}.applies_to: expected some of {list(_KINDS)}")
        networks = []
        for text in _strings(entry, "networks", where):
            try:
                networks.append(ipaddress.ip_network(text))  # strict: host bits set is a typo
            except ValueError as exc:
                raise ValueError(f"{where}.networks: {exc}") from None
        for kind in kinds:
            needles[kind] += [(needle.lower(), reason) for needle in _strings(entry, "user_agents", where)]
            exact[kind].update((agent.strip(), reason) for agent in _strings(entry, "exact_user_agents", where))
            for network in networks:
                (v4 if network.version == 4 else v6)[kind].append((network, reason))
    return {
        kind: _Rules(tuple(needles[kind]), exact[kind], _Networks(v4[kind]), _Networks(v6[kind])) for kind in _KINDS
    }


@functools.cache
def _rules() -> dict[str, _Rules]:
    # Shipped, read-only data: loaded once per process, never reloaded.
    with SOURCES_FILE.open("rb") as file:
        return parse_sources(tomllib.load(file))


def open_machine_reason(user_agent: str | None, ip: str | None) -> str | None:
    """Why an open-pixel fetch is a machine's (a privacy proxy's prefetch, a scanner's), or None."""
    return _rules()["open"].reason(user_agent, ip)


def click_machine_reason(
    user_agent: str | None,
    ip: str | None,
    method: str,
    seconds_after_sent: float | None,
    scanner_click_seconds: float,
) -> str | None:
    """Why a click is a machine's, or None: a HEAD request (a link check: a browser following a link
    sends GET), a listed scanner or gateway, or a click sooner than `scanner_click_seconds` after the
    message was sent (`seconds_after_sent`, None when unknown), faster than a person reads mail."""
    if method.upper() == "HEAD":
        return HEAD_REQUEST
    reason = _rules()["click"].reason(user_agent, ip)
    if reason is not None:
        return reason
    if seconds_after_sent is not None and seconds_after_sent < scanner_click_seconds:
        return TOO_SOON
    return None


def burst_clicks(clicks: Sequence[tuple[float, int]], burst_links: int, burst_seconds: float) -> list[bool]:
    """Which of one message's clicks belong to a burst: `burst_links` or more distinct links clicked
    within `burst_seconds`, as a security scanner follows every link of a message at once.

    `clicks` are (time in seconds, link index) pairs in any order; the answer is aligned with them.
    Every click inside such a window is flagged, repeats of a link too; a click outside every burst
    is not, so a person's later click on the same message still counts. Pass the message's recent
    clicks (those within `burst_seconds` of the new ones at least), not only the new batch's.
    """
    order = sorted(range(len(clicks)), key=lambda i: clicks[i][0])
    flagged = [False] * len(clicks)
    in_window: Counter[int] = Counter()
    left = 0
    marked = 0  # positions in `order` before this are flagged already
    for right, index in enumerate(order):
        at, link = clicks[index]
        in_window[link] += 1
        while at - clicks[order[left]][0] > burst_seconds:
            gone = clicks[order[left]][1]
            in_window[gone] -= 1
            if not in_window[gone]:
                del in_window[gone]
            left += 1
        if len(in_window) >= burst_links:
            for position in range(max(left, marked), right + 1):
                flagged[order[position]] = True
            marked = right + 1
    return flagged


def burst_is_machine(clicks: Sequence[tuple[float, int]], burst_links: int, burst_seconds: float) -> bool:
    """True when any of one message's clicks belong to a burst (see burst_clicks)."""
    return any(burst_clicks(clicks, burst_links, burst_seconds))
