"""A/B tests of campaigns: settings, the seeded split, frozen variants, the report and its z-tests, the winner."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.engine import Connection

from smartmail.addresses import AddressError, Mailbox, parse_mailbox, reject_line_breaks
from smartmail.audience.contacts import check_event_name
from smartmail.config import get_settings
from smartmail.content import rendering, template_store
from smartmail.errors import InvalidInput
from smartmail.store.models import Campaign, EngagementFirst, Event, Message, MessageState

MAX_VARIANTS = 5
METRICS = {
    "opens": "unique human opens",
    "clicks": "unique human clicks",
    "conversions": "conversions (the conversion event within conversion_hours of a human click)",
}
SIGNIFICANCE = 0.05  # two-sided p below which a difference is called significant
MAX_DURATION = 30 * 86400
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_SHARE = re.compile(r"(\d+(?:\.\d+)?)%")
_KEYS = ("variants", "test_share", "metric", "conversion_event", "conversion_hours", "duration", "auto_winner", "seed")
_VARIANT_KEYS = ("name", "subject", "template", "from_name", "send_at")
_CONVERSION_HOURS = 24.0


# --- Settings ----------------------------------------------------------------------------------


def parse_duration(value: Any, *, field: str = "ab_test.duration") -> int:
    """Seconds from a positive number of seconds or a string such as "4h", "90m", "1d12h", "45s"."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = value
    elif isinstance(value, str) and value.strip() and (match := _DURATION.fullmatch(value.strip().lower())):
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds is None or not 1 <= seconds <= MAX_DURATION:
        raise InvalidInput('must be 1 s to 30 days: seconds, or a string such as "4h", "90m", "1d12h"', field=field)
    return int(seconds)


def _share(value: Any) -> float:
    field = "ab_test.test_share"
    share: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        share = float(value)
    elif isinstance(value, str) and (match := _SHARE.fullmatch(value.strip())):
        share = float(match.group(1)) / 100
    if share is None or not 0 < share <= 1:
        raise InvalidInput(
            'must be a fraction of the audience above 0 and at most 1 (0.2), or a percentage ("20%")', field=field
        )
    return share


def _send_at(value: Any, field: str) -> str | None:
    """A variant's send time as stored: ISO 8601, naive UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInput("must be an ISO 8601 time (without an offset, UTC)", field=field) from None
    if not isinstance(value, datetime):
        raise InvalidInput("must be an ISO 8601 time (without an offset, UTC)", field=field)
    # Before the year 9999 by a margin: the test's duration is added to it at launch.
    try:
        value = value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value
    except OverflowError:  # past either end of the calendar in UTC
        raise InvalidInput("is out of range", field=field) from None
    if value.year >= 9999:
        raise InvalidInput("must be before the year 9999", field=field)
    return value.isoformat()


def _variant(session, index: int, value: Any) -> dict[str, Any]:
    field = f"ab_test.variants[{index}]"
    if not isinstance(value, Mapping):
        raise InvalidInput("must be an object: name, subject, template, from_name, send_at", field=field)
    unknown = [key for key in value if key not in _VARIANT_KEYS]
    if unknown:
        raise InvalidInput(
            f"is not a variant setting (expected one of {', '.join(_VARIANT_KEYS)})", field=f"{field}.{unknown[0]}"
        )
    name = value.get("name") or chr(ord("A") + index)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            "must be 1-32 letters, digits, _ . or -, starting with a letter or digit", field=f"{field}.name"
        )
    variant: dict[str, Any] = {"name": name}
    if value.get("subject") is not None:
        subject = value["subject"]
        if not isinstance(subject, str) or not subject.strip() or len(subject) > 998:
            raise InvalidInput("must be 1-998 characters", field=f"{field}.subject")
        try:
            reject_line_breaks(subject, field=f"{field}.subject")
            rendering.check_template_source(subject, "")
        except AddressError as exc:
            raise InvalidInput(exc.reason, field=f"{field}.subject") from None
        except rendering.TemplateError as exc:
            raise InvalidInput(f"template error: {exc}", field=f"{field}.subject") from None
        variant["subject"] = subject
    if value.get("template") is not None:
        template = value["template"]
        if not isinstance(template, str) or not template:
            raise InvalidInput("a template name is required", field=f"{field}.template")
        try:
            template_store.resolve(session, template, get_settings().templates_dir)
        except (template_store.TemplateNotFound, ValueError) as exc:
            raise InvalidInput(str(exc), field=f"{field}.template") from None
        variant["template"] = template
    if value.get("from_name") is not None:
        from_name = value["from_name"]
        if (
            not isinstance(from_name, str)
            or not from_name.strip()
            or len(from_name) > 200
            or not from_name.isprintable()
        ):
            raise InvalidInput("must be 1-200 printable characters", field=f"{field}.from_name")
        variant["from_name"] = from_name.strip()
    send_at = _send_at(value.get("send_at"), f"{field}.send_at")
    if send_at is not None:
        variant["send_at"] = send_at
    return variant


def check(session, value: Any) -> dict[str, Any] | None:
    """An `ab_test` setting as stored, or None for no test; InvalidInput names the bad key
    (`ab_test.variants[1].template`). Without a `seed`, a random one is drawn and kept, so the
    split can be made again."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidInput("must be an object with variants, test_share, duration, …, or null", field="ab_test")
    unknown = [key for key in value if key not in _KEYS]
    if unknown:
        raise InvalidInput(
            f"is not an A/B test setting (expected one of {', '.join(_KEYS)})", field=f"ab_test.{unknown[0]}"
        )
    variants = value.get("variants")
    if not isinstance(variants, Sequence) or isinstance(variants, str) or not 2 <= len(variants) <= MAX_VARIANTS:
        raise InvalidInput(f"give 2-{MAX_VARIANTS} variants", field="ab_test.variants")
    checked = [_variant(session, i, variant) for i, variant in enumerate(variants)]
    names = [variant["name"] for variant in checked]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidInput(f"variant {name!r} is named twice", field=f"ab_test.variants[{i}].name")
    if "test_share" not in value:
        raise InvalidInput(
            'the share of the audience that gets the test is required (0.2, or "20%")', field="ab_test.test_share"
        )
    if "duration" not in value:
        raise InvalidInput('how long the test runs is required (seconds, or "4h")', field="ab_test.duration")
    metric = "opens" if value.get("metric") is None else value["metric"]
    if metric not in METRICS:
        raise InvalidInput(f"must be one of {', '.join(METRICS)}", field="ab_test.metric")
    conversion_event = value.get("conversion_event")
    if conversion_event is not None:
        conversion_event = check_event_name(conversion_event, field="ab_test.conversion_event")
    elif metric == "conversions":
        raise InvalidInput(
            "the conversions metric needs the event that counts (e.g. order_placed)", field="ab_test.conversion_event"
        )
    hours = _CONVERSION_HOURS if value.get("conversion_hours") is None else value["conversion_hours"]
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= 24 * 90:
        raise InvalidInput("must be a number of hours above 0, at most 2160", field="ab_test.conversion_hours")
    auto_winner = True if value.get("auto_winner") is None else value["auto_winner"]
    if not isinstance(auto_winner, bool):
        raise InvalidInput("must be true or false", field="ab_test.auto_winner")
    seed = value.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInput("must be a non-negative integer", field="ab_test.seed")
    return {
        "variants": checked,
        "test_share": _share(value["test_share"]),
        "metric": metric,
        "conversion_event": conversion_event,
        "conversion_hours": hours,
        "duration": parse_duration(value["duration"]),
        "auto_winner": auto_winner,
        "seed": seed,
    }


# --- The split ---------------------------------------------------------------------------------


def place(seed: int, contact_id: int, share: float, count: int) -> int | None:
    """The variant (0-based) a contact gets in the test, None if it is not in the test share. A hash
    of the seed and the contact id, uniform in [0, 1): the same seed makes the same split whatever
    the fan-out's pages, and a resumed fan-out places every contact where the first run did."""
    digest = hashlib.blake2b(f"{seed}:{contact_id}".encode(), digest_size=8).digest()
    spot = int.from_bytes(digest, "big") / 2**64
    if spot >= share:
        return None
    return min(int(spot / share * count), count - 1)


@dataclass(frozen=True)
class Placed:
    """What a fan-out page's row of an A/B campaign gets: the variant recorded (None: not in the
    test), the variant whose content it is sent with, its sender, and when it may go out."""

    variant: str | None
    renders: str
    sender: str
    send_at: datetime | None


class Split:
    """An A/B campaign's fan-out placement, built once a page from the campaign row."""

    def __init__(self, campaign: Campaign) -> None:
        settings = campaign.ab_test or {}
        self.seed, self.share = settings["seed"], settings["test_share"]
        self.variants = campaign.ab_frozen or []
        self.winner = next((v for v in self.variants if v["name"] == campaign.ab_winner), None)

    def place(self, contact_id: int, now: datetime) -> Placed | None:
        """Before a winner: the contact's test variant, None outside the test share. After: the winner, unrecorded."""
        if self.winner is not None:
            return Placed(None, self.winner["name"], self.winner["sender"], None)
        index = place(self.seed, contact_id, self.share, len(self.variants))
        if index is None:
            return None
        variant = self.variants[index]
        send_at = datetime.fromisoformat(variant["send_at"]) if variant.get("send_at") else None
        return Placed(
            variant["name"], variant["name"], variant["sender"], send_at if send_at and send_at > now else None
        )


# --- Launch ------------------------------------------------------------------------------------


def freeze(
    campaign: Campaign, frozen_template: Callable[[str], tuple[str | None, str | None, str | None, int | None]]
) -> None:
    """At launch: each variant's content frozen as the campaign's own is (`frozen_template(name)`:
    subject, html, text, version), its sender, and when the winner is due: the test's duration
    after the last variant's send time (or the launch)."""
    settings = campaign.ab_test or {}
    address = parse_mailbox(campaign.sender, field="from_").address
    frozen = []
    for variant in settings["variants"]:
        template = variant.get("template") or campaign.template_name
        if template == campaign.template_name:
            subject, html, text, version = campaign.subject, campaign.html, campaign.text, campaign.template_version
        else:
            subject, html, text, version = frozen_template(template)
        sender = str(Mailbox(address, variant["from_name"])) if variant.get("from_name") else campaign.sender
        frozen.append(
            {
                "name": variant["name"],
                "subject": variant.get("subject") or subject,
                "html": html,
                "text": text,
                "template": template,
                "template_version": version,
                "sender": sender,
                "send_at": variant.get("send_at"),
            }
        )
    campaign.ab_frozen = frozen
    assert campaign.launched_at is not None
    starts = [campaign.launched_at] + [datetime.fromisoformat(v["send_at"]) for v in frozen if v["send_at"]]
    campaign.ab_decide_at = max(starts) + timedelta(seconds=settings["duration"])


def declare_winner(campaign: Campaign, name: str, now: datetime) -> None:
    """Record the winner and start the fan-out over: its next pages are the rest of the audience,
    each contact without a message getting the winner (the caller hands the fan-out on)."""
    campaign.ab_winner = name
    campaign.ab_decided_at = now
    campaign.cursor = 0
    campaign.fanned_out = False


# --- The report --------------------------------------------------------------------------------


def z_test(successes_a: int, total_a: int, successes_b: int, total_b: int) -> tuple[float | None, float | None]:
    """Pooled two-proportion z-test of a against b: (z, two-sided p); (None, None) when it cannot be
    computed (a group without messages, or both rates 0 or both 1)."""
    if total_a <= 0 or total_b <= 0:
        return None, None
    pooled = (successes_a + successes_b) / (total_a + total_b)
    error = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    if error == 0:
        return None, None
    z = (successes_a / total_a - successes_b / total_b) / error
    return z, math.erfc(abs(z) / math.sqrt(2))


def _first_hit(link_test) -> Any:
    first = EngagementFirst
    return exists().where(first.message_id == Message.id, link_test, first.machine.is_(False))


def _counts(connection: Connection, campaign_id: int) -> dict[str, dict[str, int]]:
    """Per variant: test messages sent, and of those, how many a person opened and clicked."""
    opened = _first_hit(EngagementFirst.link == 0)
    clicked = _first_hit(EngagementFirst.link > 0)
    rows = connection.execute(
        select(
            Message.variant,
            func.count(),
            func.sum(case((opened, 1), else_=0)),
            func.sum(case((clicked, 1), else_=0)),
        )
        .where(
            Message.campaign_id == campaign_id,
            Message.variant.isnot(None),
            Message.state == MessageState.SENT.value,
        )
        .group_by(Message.variant)
    )
    return {
        variant: {"sent": sent, "opens": int(opens or 0), "clicks": int(clicks or 0)}
        for variant, sent, opens, clicks in rows
    }


def _conversions(connection: Connection, campaign_id: int, event: str, hours: float) -> dict[str, int]:
    """Per variant: test messages whose contact had `event` within `hours` after the message's first human click."""
    first = EngagementFirst
    clicks: Sequence[Any] = connection.execute(
        select(Message.variant, Message.contact_id, func.min(first.occurred_at))
        .join(first, and_(first.message_id == Message.id, first.link > 0, first.machine.is_(False)))
        .where(
            Message.campaign_id == campaign_id,
            Message.variant.isnot(None),
            Message.state == MessageState.SENT.value,
            Message.contact_id.isnot(None),
        )
        .group_by(Message.id, Message.variant, Message.contact_id)
    ).all()
    if not clicks:
        return {}
    window = timedelta(hours=hours)
    events: dict[Any, list[datetime]] = defaultdict(list)
    contact_ids = sorted({contact_id for _, contact_id, _ in clicks})
    since = min(at for _, _, at in clicks)
    for start in range(0, len(contact_ids), 1000):
        for contact_id, at in connection.execute(
            select(Event.contact_id, Event.occurred_at).where(
                Event.contact_id.in_(contact_ids[start : start + 1000]),
                Event.type == event,
                Event.occurred_at >= since,
            )
        ):
            events[contact_id].append(at)
    converted: dict[str, int] = defaultdict(int)
    for variant, contact_id, clicked_at in clicks:
        if any(clicked_at <= at <= clicked_at + window for at in events.get(contact_id, ())):
            converted[variant] += 1
    return dict(converted)


def _rate(part: int | None, whole: int) -> float | None:
    return round(part / whole, 4) if whole and part is not None else None


def report(connection: Connection, campaign: Any) -> dict[str, Any]:
    """Each variant's test messages sent (delivered: state sent), unique human opens and clicks,
    conversions, their rates, and a z-test of its metric against the leader's; the leader is the
    best rate of the metric, the earliest variant on a tie. `campaign`: a Campaign row."""
    settings = campaign.ab_test
    metric = settings["metric"]
    counts = _counts(connection, campaign.id)
    conversions = (
        _conversions(connection, campaign.id, settings["conversion_event"], settings["conversion_hours"])
        if settings.get("conversion_event")
        else None
    )
    frozen = {v["name"]: v for v in campaign.ab_frozen or ()}
    variants = []
    for variant in settings["variants"]:
        name = variant["name"]
        found = counts.get(name, {"sent": 0, "opens": 0, "clicks": 0})
        converted = None if conversions is None else conversions.get(name, 0)
        row = {
            "name": name,
            "subject": frozen.get(name, variant).get("subject"),
            "template": frozen.get(name, variant).get("template"),
            "from_name": variant.get("from_name"),
            "send_at": variant.get("send_at"),
            "sent": found["sent"],
            "opens": found["opens"],
            "clicks": found["clicks"],
            "conversions": converted,
            "open_rate": _rate(found["opens"], found["sent"]),
            "click_rate": _rate(found["clicks"], found["sent"]),
            "conversion_rate": _rate(converted, found["sent"]),
        }
        row["successes"] = {"opens": found["opens"], "clicks": found["clicks"], "conversions": converted or 0}[metric]
        variants.append(row)
    # max() keeps the first of equal rates: ties go to the earliest variant.
    leader = max(variants, key=lambda v: v["successes"] / v["sent"] if v["sent"] else 0.0)
    for row in variants:
        row["rate"] = _rate(row["successes"], row["sent"])
        if row is leader:
            row.update(z=None, p_value=None, significant=None, verdict="leader")
            continue
        z, p = z_test(row["successes"], row["sent"], leader["successes"], leader["sent"])
        significant = p is not None and p < SIGNIFICANCE
        row.update(
            z=None if z is None else round(z, 4), p_value=None if p is None else round(p, 6), significant=significant
        )
        if p is None:
            row["verdict"] = f"no test possible against {leader['name']} (no messages, or both rates 0 or 1)"
        elif significant:
            row["verdict"] = f"significantly below {leader['name']} (p = {p:.4f})"
        else:
            row["verdict"] = f"not significantly different from {leader['name']} (p = {p:.4f})"
    others = [row for row in variants if row is not leader]
    clear = all(row["significant"] for row in others)
    if clear:
        conclusion = (
            f"{leader['name']} leads on {METRICS[metric]}, significantly (p < {SIGNIFICANCE}) against every other"
        )
    else:
        conclusion = (
            f"{leader['name']} leads on {METRICS[metric]}, but the difference is not significant "
            f"(p >= {SIGNIFICANCE}) against {', '.join(row['name'] for row in others if not row['significant'])}"
        )
    return {
        "campaign": campaign.name,
        "state": campaign.state,
        "metric": metric,
        "conversion_event": settings.get("conversion_event"),
        "conversion_hours": settings.get("conversion_hours"),
        "test_share": settings["test_share"],
        "duration": settings["duration"],
        "auto_winner": settings["auto_winner"],
        "seed": settings["seed"],
        "decide_at": campaign.ab_decide_at,
        "winner": campaign.ab_winner,
        "decided_at": campaign.ab_decided_at,
        "leader": leader["name"],
        "significant": clear,
        "conclusion": conclusion,
        "variants": variants,
    }
