"""Campaigns: create, change, list, schedule, launch, pause, resume and cancel; run what is due; report progress."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError

from smartmail.addresses import AddressError, parse_mailbox
from smartmail.audience.contacts import InvalidInput, NotFound, check_list_name
from smartmail.campaigns import ab_tests
from smartmail.campaigns.fan_out import (
    audience_query,
    fan_out,
    hand_fan_out,
    known_zone,
    take_lost_fan_outs,
)
from smartmail.config import get_settings
from smartmail.content import email_html, rendering, template_store
from smartmail.content.tracking_links import UTM_KEYS
from smartmail.errors import ConflictingInput
from smartmail.store.engine import reader, session_scope, utcnow
from smartmail.store.models import (
    Campaign,
    CampaignState,
    ContactList,
    Message,
    MessageState,
    Segment,
)
from smartmail.workers.campaign_rows import window_opens
from smartmail.workers.dispatch import publish

log = structlog.get_logger("smartmail.campaigns")

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_OPEN = (
    MessageState.QUEUED.value,
    MessageState.SENDING.value,
    MessageState.DEFERRED.value,
    MessageState.SCHEDULED.value,
)


# --- Send windows ------------------------------------------------------------------------------


def parse_window(value: str | None, *, field: str = "window") -> tuple[str, str] | None:
    """`"08:00-20:00"` → ("08:00", "20:00"); a window may wrap midnight ("22:00-06:00")."""
    if value is None:
        return None
    match = _WINDOW.match(value) if isinstance(value, str) else None
    if not match or value[:5] == value[6:]:
        raise InvalidInput('expected "HH:MM-HH:MM" in 24-hour time, start and end different', field=field)
    return value[:5], value[6:]


# --- The API -----------------------------------------------------------------------------------


class CampaignConflict(ConflictingInput):
    """The campaign's state (or its name, taken) does not allow the request."""


@dataclass(frozen=True)
class CampaignStatus:
    name: str
    state: str
    counts: dict[str, int]
    total: int
    rate: float  # messages sent per second over the last minute
    eta_seconds: float | None
    fanned_out: bool
    feedback: dict[str, int]  # hard_bounces, soft_bounces, complaints reported after delivery
    paused_reason: str | None  # why it paused itself, if it did


# What a draft or scheduled campaign may change; create_campaign takes these too.
EDITABLE = (
    "template",
    "lists",
    "segment",
    "from_",
    "reply_to",
    "send_at",
    "window",
    "window_timezone",
    "rate_cap",
    "tags",
    "resend_unknown",
    "tracking",
    "utm",
    "preheader",
    "ab_test",
)
_CHANGEABLE = (CampaignState.DRAFT.value, CampaignState.SCHEDULED.value)


def _identifying(name: str) -> Iterator[Any]:
    """The conditions to try in turn: the name, then for a number the id (a name wins over an id)."""
    if "\x00" in name:  # no campaign has one (PostgreSQL text cannot hold it)
        return
    yield Campaign.name == name
    if name.isascii() and name.isdigit() and int(name) < 2**31:
        yield Campaign.id == int(name)


def _get(session, name: str) -> Campaign:
    """The campaign, its row locked until the transaction ends: a launch, a change and a pause of
    one campaign take turns (FOR UPDATE; SQLite has one writer at a time anyway)."""
    for condition in _identifying(name):
        campaign = session.scalar(select(Campaign).where(condition).with_for_update())
        if campaign is not None:
            return campaign
    raise NotFound(f"no campaign named {name!r}")


def as_dict(campaign: Campaign) -> dict[str, Any]:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "state": campaign.state,
        "template": campaign.template_name,
        "template_version": campaign.template_version,
        "lists": list(campaign.lists or ()),
        "segment": campaign.segment,
        "from": campaign.sender,
        "reply_to": campaign.reply_to,
        "send_at": campaign.send_at,
        "window": f"{campaign.window_start}-{campaign.window_end}" if campaign.window_start else None,
        "window_timezone": campaign.window_timezone,
        "rate_cap": campaign.rate_cap,
        "tags": list(campaign.tags or ()),
        "resend_unknown": campaign.resend_unknown,
        "tracking": campaign.tracking,
        "utm": dict(campaign.utm) if campaign.utm else None,
        "preheader": campaign.preheader,
        "fanned_out": campaign.fanned_out,
        "hard_bounces": campaign.hard_bounces,
        "soft_bounces": campaign.soft_bounces,
        "complaints": campaign.complaints,
        "paused_reason": campaign.paused_reason,
        "ab_test": dict(campaign.ab_test) if campaign.ab_test else None,
        "ab_decide_at": campaign.ab_decide_at,
        "ab_winner": campaign.ab_winner,
        "ab_decided_at": campaign.ab_decided_at,
        "created_at": campaign.created_at,
        "launched_at": campaign.launched_at,
        "finished_at": campaign.finished_at,
    }


def _naive_utc(moment: datetime | None) -> datetime | None:
    """A time as stored: naive UTC; a naive one is UTC already."""
    if moment is None or moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # past year 9999 in UTC
        raise InvalidInput("is out of range", field="send_at") from None


def _columns(session, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The campaign's columns for the settings given (names as in EDITABLE), each checked; an
    InvalidInput names the first bad one. Settings not given are left out."""
    unknown = [key for key in settings if key not in EDITABLE]
    if unknown:
        raise InvalidInput("cannot be set on a campaign", field=unknown[0])
    return {**_content_columns(session, settings), **_delivery_columns(settings), **_tracking_columns(settings)}


def _content_columns(session, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What and to whom: the template, lists and segment must exist."""
    values: dict[str, Any] = {}
    if "template" in settings:
        template = settings["template"]
        if not isinstance(template, str) or not template:
            raise InvalidInput("a template name is required", field="template")
        try:
            template_store.resolve(session, template, get_settings().templates_dir)
        except (template_store.TemplateNotFound, ValueError) as exc:
            raise InvalidInput(str(exc), field="template") from None
        values["template_name"] = template
    if "lists" in settings:
        values["lists"] = list(settings["lists"] or ())
        for i, list_name in enumerate(values["lists"]):
            check_list_name(list_name, field=f"lists[{i}]")
            if session.scalar(select(ContactList.id).where(ContactList.name == list_name)) is None:
                raise InvalidInput(f"no list named {list_name!r}", field=f"lists[{i}]")
    if "segment" in settings:
        segment = values["segment"] = settings["segment"] or None
        # A saved segment's name is printable (save_segment), so an other one is not looked up.
        if segment and (
            not isinstance(segment, str)
            or not segment.isprintable()
            or session.scalar(select(Segment.id).where(Segment.name == segment)) is None
        ):
            raise InvalidInput(f"no saved segment named {values['segment']!r}", field="segment")
    if "ab_test" in settings:
        values["ab_test"] = ab_tests.check(session, settings["ab_test"])
    return values


def _delivery_columns(settings: Mapping[str, Any]) -> dict[str, Any]:
    """From whom, when and how fast."""
    values: dict[str, Any] = {}
    defaults = get_settings()
    try:
        if "from_" in settings:
            values["sender"] = str(parse_mailbox(settings["from_"] or defaults.default_sender, field="from_"))
        if "reply_to" in settings:
            reply_to = settings["reply_to"]
            values["reply_to"] = str(parse_mailbox(reply_to, field="reply_to")) if reply_to else None
    except AddressError as exc:
        raise InvalidInput(exc.reason, field=exc.field) from None
    if "send_at" in settings:
        values["send_at"] = _naive_utc(settings["send_at"])
    if "window" in settings:
        start_end = parse_window(settings["window"])
        values["window_start"], values["window_end"] = start_end or (None, None)
    if "window_timezone" in settings:
        zone = settings["window_timezone"] or "UTC"
        if known_zone(zone, "") != zone:
            raise InvalidInput(f"unknown time zone {zone!r}", field="window_timezone")
        values["window_timezone"] = zone
    if "rate_cap" in settings:
        rate_cap = settings["rate_cap"]
        if rate_cap is not None and (
            isinstance(rate_cap, bool) or not isinstance(rate_cap, (int, float)) or not 0 < rate_cap < float("inf")
        ):
            raise InvalidInput("must be a positive number of messages per second", field="rate_cap")
        values["rate_cap"] = rate_cap
    if "tags" in settings:
        values["tags"] = list(settings["tags"] or ())
    if "resend_unknown" in settings:
        if not isinstance(settings["resend_unknown"], bool):
            raise InvalidInput("must be true or false", field="resend_unknown")
        values["resend_unknown"] = settings["resend_unknown"]
    return values


def _tracking_columns(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Open and click tracking, the UTM parameters tracked links get, and the preheader (which
    replaces the template's)."""
    values: dict[str, Any] = {}
    if "tracking" in settings:
        if not isinstance(settings["tracking"], bool):
            raise InvalidInput("must be true or false", field="tracking")
        values["tracking"] = settings["tracking"]
    if "utm" in settings:
        values["utm"] = check_utm(settings["utm"])
    if "preheader" in settings:
        values["preheader"] = email_html.check_preheader(settings["preheader"])
    return values


def check_utm(utm: Any, *, field: str = "utm") -> dict[str, str] | None:
    """UTM parameters as stored: None, or an object whose keys are among UTM_KEYS and whose values
    are 1-200 printable characters (an empty object is None)."""
    if utm is None:
        return None
    if not isinstance(utm, Mapping):
        raise InvalidInput(f"must be an object with keys among {', '.join(UTM_KEYS)}, or null", field=field)
    for key, value in utm.items():
        if key not in UTM_KEYS:
            expected = ", ".join(UTM_KEYS)
            raise InvalidInput(f"is not a UTM parameter (expected one of {expected})", field=f"{field}.{key}")
        if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
            raise InvalidInput("must be 1-200 printable characters", field=f"{field}.{key}")
    return {key: utm[key] for key in UTM_KEYS if key in utm} or None


def _check_audience(lists: list[str], segment: str | None) -> None:
    if not lists and not segment:
        raise InvalidInput("give lists, a segment, or both", field="audience")


def create_campaign(
    name: str,
    *,
    template: str,
    lists: Iterable[str] = (),
    segment: str | None = None,
    from_: str | None = None,
    reply_to: str | None = None,
    send_at: datetime | None = None,
    window: str | None = None,
    window_timezone: str = "UTC",
    rate_cap: float | None = None,
    tags: Iterable[str] = (),
    resend_unknown: bool = False,
    tracking: bool = True,
    utm: Mapping[str, str] | None = None,
    preheader: str | None = None,
    ab_test: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A draft campaign (scheduled with `send_at`): `template` to the members of `lists` and/or
    the saved `segment`, minus suppressed and non-subscribed contacts. Errors name the field;
    nothing is stored then. `resend_unknown`: at-least-once, messages a worker crash left
    `unknown` (their content may have reached the relay) are sent again; a recipient may then get
    a duplicate. `tracking`: open and click tracking; `utm`: UTM parameters for its tracked links
    (keys among UTM_KEYS); `preheader`: hidden preview text replacing the template's; `ab_test`:
    an A/B test (docs/ab-tests.md; checked by ab_tests.check). Returns the campaign (as_dict)."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or not name.isprintable() or "/" in name:
        raise InvalidInput("a name of 1-200 printable characters other than / is required", field="name")
    lists = list(lists)
    _check_audience(lists, segment)
    settings = {
        "template": template,
        "lists": lists,
        "segment": segment,
        "from_": from_,
        "reply_to": reply_to,
        "send_at": send_at,
        "window": window,
        "window_timezone": window_timezone,
        "rate_cap": rate_cap,
        "tags": tags,
        "resend_unknown": resend_unknown,
        "tracking": tracking,
        "utm": utm,
        "preheader": preheader,
        "ab_test": ab_test,
    }
    with session_scope() as session:
        values = _columns(session, settings)
        if session.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
            raise CampaignConflict(f"a campaign named {name!r} exists already", field="name")
        state = CampaignState.SCHEDULED if send_at is not None else CampaignState.DRAFT
        campaign = Campaign(name=name, state=state.value, cursor=0, fanned_out=False, **values)
        session.add(campaign)
        try:
            session.flush()
        except IntegrityError:  # the same name, created by another request since the check
            raise CampaignConflict(f"a campaign named {name!r} exists already", field="name") from None
        return as_dict(campaign)


def update_campaign(name: str, **settings: Any) -> dict[str, Any]:
    """Change a draft or scheduled campaign (settings named as in EDITABLE; others stay). Setting
    `send_at` schedules it, clearing it makes it a draft again. A campaign in another state raises
    CampaignConflict; its row is locked meanwhile, so a launch waits and sends the changed one."""
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state not in _CHANGEABLE:
            raise CampaignConflict(
                f"campaign {campaign.name!r} is {campaign.state}; only a draft or scheduled one can change",
                field="state",
            )
        values = _columns(session, settings)
        _check_audience(values.get("lists", campaign.lists), values.get("segment", campaign.segment))
        for column, value in values.items():
            setattr(campaign, column, value)
        if "send_at" in values:
            campaign.state = (CampaignState.SCHEDULED if values["send_at"] else CampaignState.DRAFT).value
        session.flush()
        return as_dict(campaign)


def get_campaign(name: str) -> dict[str, Any]:
    """One campaign by name (or id); NotFound otherwise."""
    with session_scope() as session:
        for condition in _identifying(name):
            campaign = session.scalar(select(Campaign).where(condition))
            if campaign is not None:
                return as_dict(campaign)
    raise NotFound(f"no campaign named {name!r}")


def list_campaigns(*, limit: int, before: int | None = None, state: str | None = None) -> list[dict[str, Any]]:
    """Up to `limit` campaigns, newest first; `before` is the last id of the previous page (keyset)."""
    query = select(Campaign).order_by(Campaign.id.desc()).limit(limit)
    if before is not None:
        query = query.where(Campaign.id < before)
    if state is not None:
        query = query.where(Campaign.state == state)
    with session_scope() as session:
        return [as_dict(campaign) for campaign in session.scalars(query)]


def schedule_campaign(name: str, send_at: datetime) -> None:
    """Start the campaign at `send_at` (beat starts it); a draft or scheduled campaign only."""
    sources = {CampaignState.DRAFT, CampaignState.SCHEDULED}
    _transition(name, sources, CampaignState.SCHEDULED, send_at=_naive_utc(send_at))


def launch_campaign(name: str) -> None:
    """Start now: freeze the template and fan out on the bulk queue."""
    with session_scope() as session:
        campaign = _get(session, name)
        try:
            started = _start(session, campaign)
        except template_store.TemplateNotFound as exc:  # deleted since the campaign was created
            raise CampaignConflict(str(exc), field="template") from None
        if not started:
            raise CampaignConflict(
                f"campaign {campaign.name!r} is {campaign.state}; only a draft or scheduled one can launch",
                field="state",
            )
        campaign_id, owner = campaign.id, campaign.fan_out_owner
    log.info("campaign.started", campaign_id=campaign_id, campaign=name)
    _publish_fan_out(campaign_id, owner)


def pause_campaign(name: str) -> None:
    """Workers stop claiming its messages at once; the rest stay queued until resumed."""
    _transition(name, {CampaignState.SENDING}, CampaignState.PAUSED)


def resume_campaign(name: str) -> None:
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state != CampaignState.PAUSED.value:
            raise CampaignConflict(f"campaign {campaign.name!r} is {campaign.state}, not paused", field="state")
        campaign.state = CampaignState.SENDING.value
        owner = hand_fan_out(campaign, utcnow())
        campaign_id = campaign.id
    log.info("campaign.resumed", campaign_id=campaign_id, campaign=name)
    _publish_fan_out(campaign_id, owner)  # finishes the fan-out if unfinished, and re-dispatches what waits


def cancel_campaign(name: str) -> int:
    """Nothing more is sent; messages not yet sent become `cancelled`. Returns how many."""
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state in (CampaignState.SENT.value, CampaignState.CANCELLED.value):
            raise CampaignConflict(f"campaign {campaign.name!r} is {campaign.state} already", field="state")
        campaign.state = CampaignState.CANCELLED.value
        campaign.finished_at = utcnow()
        session.flush()  # the campaign's row first, then its messages: the order delivery's recording keeps
        result = session.execute(
            update(Message)
            .where(
                Message.campaign_id == campaign.id,
                Message.state.in_(
                    [MessageState.QUEUED.value, MessageState.DEFERRED.value, MessageState.SCHEDULED.value]
                ),
            )
            .values(state=MessageState.CANCELLED.value, finished_at=utcnow(), reason="campaign cancelled"),
            execution_options={"synchronize_session": False},
        )
        cancelled = result.rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
        campaign_id = campaign.id
    log.info("campaign.cancelled", campaign_id=campaign_id, campaign=name, messages_cancelled=cancelled)
    return cancelled


def _transition(name: str, sources: set[CampaignState], target: CampaignState, **values) -> None:
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state not in {s.value for s in sources}:
            raise CampaignConflict(
                f"campaign {campaign.name!r} is {campaign.state}; cannot go to {target.value}", field="state"
            )
        campaign.state = target.value
        for key, value in values.items():
            setattr(campaign, key, value)
        campaign_id = campaign.id
    log.info(f"campaign.{target.value}", campaign_id=campaign_id, campaign=name)


def _start(session, campaign: Campaign, now: datetime | None = None) -> bool:
    """draft/scheduled → sending, with the template frozen; False if it was not startable."""
    if campaign.state not in (CampaignState.DRAFT.value, CampaignState.SCHEDULED.value):
        return False
    subject, html, text, version = _frozen_template(session, campaign.template_name, campaign.preheader)
    campaign.subject, campaign.html, campaign.text, campaign.template_version = subject, html, text, version
    campaign.state = CampaignState.SENDING.value
    campaign.launched_at = now or utcnow()
    if campaign.ab_test is not None:
        ab_tests.freeze(campaign, lambda template: _frozen_template(session, template, campaign.preheader))
    hand_fan_out(campaign, campaign.launched_at)
    return True


def _frozen_template(
    session, template_name: str, own_preheader: str | None
) -> tuple[str | None, str | None, str | None, int | None]:
    """A template's subject, HTML (with the preheader: the campaign's own, else the template's)
    and text as a launch freezes them, and its version (None for a file template)."""
    settings = get_settings()
    ref = template_store.resolve(session, template_name, settings.templates_dir)
    if ref.version is not None:
        parts = {
            part: template_store.load_part(None, ref.name, ref.version, part, session=session)
            for part in ("subject", "html", "text", "preheader")
        }
    else:
        assert ref.path is not None  # a reference without a version is a file template
        files = {**template_store.FILE_PARTS, "preheader": template_store.FILE_PREHEADER}
        parts = {
            part: (ref.path / filename).read_text(encoding="utf-8") if (ref.path / filename).is_file() else None
            for part, filename in files.items()
        }
        parts["preheader"] = (parts["preheader"] or "").strip() or None
    # The preheader goes into the frozen HTML; its CSS is inlined as workers compile it (rendering).
    preheader = own_preheader or parts["preheader"]
    html = email_html.add_preheader(parts["html"], preheader) if parts["html"] else parts["html"]
    text = parts["text"]
    if text is None and html:
        text = rendering.text_source_from_html(html)
    return parts["subject"], html, text, ref.version


def _publish_fan_out(campaign_id: int, owner: str | None) -> None:
    publish("smartmail.campaign.fan_out", campaign_id, owner)


def campaign_status(name: str) -> CampaignStatus:
    """Counts per message state, the rate over the last minute and the time left, by name (or id)."""
    with reader() as connection:
        for condition in _identifying(name):
            campaign = connection.execute(
                select(
                    Campaign.id,
                    Campaign.name,
                    Campaign.state,
                    Campaign.fanned_out,
                    Campaign.hard_bounces,
                    Campaign.soft_bounces,
                    Campaign.complaints,
                    Campaign.paused_reason,
                ).where(condition)
            ).first()
            if campaign is not None:
                break
        else:
            raise NotFound(f"no campaign named {name!r}")
        counts = dict(
            connection.execute(
                select(Message.state, func.count()).where(Message.campaign_id == campaign.id).group_by(Message.state)
            ).all()
        )
        minute_ago = utcnow() - timedelta(seconds=60)
        recent = connection.scalar(
            select(func.count()).where(
                Message.campaign_id == campaign.id,
                Message.state == MessageState.SENT.value,
                Message.finished_at >= minute_ago,
            )
        )
    remaining = sum(counts.get(s, 0) for s in _OPEN)
    rate = (recent or 0) / 60.0
    return CampaignStatus(
        campaign.name,
        campaign.state,
        counts,
        sum(counts.values()),
        rate,
        remaining / rate if rate > 0 else None,
        bool(campaign.fanned_out),
        {
            "hard_bounces": campaign.hard_bounces,
            "soft_bounces": campaign.soft_bounces,
            "complaints": campaign.complaints,
        },
        campaign.paused_reason,
    )


def run_due(now: datetime | None = None) -> None:
    """Start scheduled campaigns whose time has come, restart fan-outs whose lease ran out, and
    mark finished campaigns sent."""
    now = now or utcnow()
    with session_scope() as session:
        # Locked as a launch locks them; one being changed right now is left for the next run.
        due = session.scalars(
            select(Campaign)
            .where(Campaign.state == CampaignState.SCHEDULED.value, Campaign.send_at <= now)
            .with_for_update(skip_locked=True)
        ).all()
        started = [(c.id, c.name, c.fan_out_owner) for c in due if _start(session, c, now)]
    for campaign_id, name, owner in started:
        log.info("campaign.started", campaign_id=campaign_id, campaign=name)
        _publish_fan_out(campaign_id, owner)
    for campaign_id, name, owner in take_lost_fan_outs(now):
        log.warning("campaign.fan_out_restarted", campaign_id=campaign_id, campaign=name)
        _publish_fan_out(campaign_id, owner)
    for campaign_id, owner in _decide_ab_tests(now):
        _publish_fan_out(campaign_id, owner)
    open_messages = exists().where(Message.campaign_id == Campaign.id, Message.state.in_(_OPEN))
    # An A/B campaign whose test has sent everything waits for its winner and the rest of its audience.
    no_test_waiting = Campaign.ab_test.is_(None) | Campaign.ab_winner.isnot(None)
    with session_scope() as session:
        finished = session.execute(
            update(Campaign)
            .where(Campaign.state == CampaignState.SENDING.value, Campaign.fanned_out, no_test_waiting, ~open_messages)
            .values(state=CampaignState.SENT.value, finished_at=now)
            .returning(Campaign.id, Campaign.name),
            execution_options={"synchronize_session": False},
        ).all()
    for campaign_id, name in finished:
        log.info("campaign.sent", campaign_id=campaign_id, campaign=name)


# --- A/B tests ---------------------------------------------------------------------------------


def _decide_ab_tests(now: datetime) -> list[tuple[int, str]]:
    """Sending A/B campaigns whose test is over (duration passed, its fan-out done) and whose
    winner is picked automatically: the winner picked, and the fan-out handed on to the rest of
    the audience. (campaign id, fan-out owner) of each, to publish after the commit."""
    decided = []
    with session_scope() as session:
        due = session.scalars(
            select(Campaign)
            .where(
                Campaign.state == CampaignState.SENDING.value,
                Campaign.ab_winner.is_(None),
                Campaign.ab_decide_at <= now,
                Campaign.fanned_out,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for campaign in due:
            if not campaign.ab_test or not campaign.ab_test.get("auto_winner", True):
                continue
            if not _test_sent_long_enough(session, campaign.id, campaign.ab_test["duration"], now):
                continue
            found = ab_tests.report(session.connection(), campaign)
            ab_tests.declare_winner(campaign, found["leader"], now)
            decided.append((campaign.id, hand_fan_out(campaign, now)))
            log.info(
                "campaign.ab_winner", campaign=campaign.name, winner=found["leader"], conclusion=found["conclusion"]
            )
    return decided


def _test_sent_long_enough(session, campaign_id: int, duration: float, now: datetime) -> bool:
    """Whether every test email has been sent (or has failed) and the test's duration has passed
    since the last one went: a send window, a frequency cap or a throttled site can hold test
    emails past the planned decision, and a winner picked from unsent variants means nothing."""
    test = (Message.campaign_id == campaign_id, Message.variant.is_not(None))
    if session.scalar(select(Message.id).where(*test, Message.state.in_(_OPEN)).limit(1)) is not None:
        return False
    last = session.scalar(select(func.max(Message.finished_at)).where(*test))
    return last is None or last + timedelta(seconds=duration) <= now


def ab_report(name: str) -> dict[str, Any]:
    """An A/B campaign's report (ab_tests.report): each variant's numbers and its z-test against
    the leader. NotFound for an unknown campaign; InvalidInput naming `ab_test` for one without a test."""
    with session_scope() as session:
        for condition in _identifying(name):
            campaign = session.scalar(select(Campaign).where(condition))
            if campaign is not None:
                break
        else:
            raise NotFound(f"no campaign named {name!r}")
        if campaign.ab_test is None:
            raise InvalidInput(f"campaign {campaign.name!r} has no A/B test", field="ab_test")
        return ab_tests.report(session.connection(), campaign)


def pick_ab_winner(name: str, variant: str | None = None) -> dict[str, Any]:
    """Pick the winner of a launched A/B campaign's test now: `variant`, or the leader by the
    test's metric; the rest of the audience gets it (when the campaign is paused, once resumed).
    The report as it was when picked."""
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.ab_test is None:
            raise InvalidInput(f"campaign {campaign.name!r} has no A/B test", field="ab_test")
        if campaign.ab_winner is not None:
            raise CampaignConflict(
                f"campaign {campaign.name!r} has its winner already: {campaign.ab_winner}", field="ab_winner"
            )
        if campaign.state not in (CampaignState.SENDING.value, CampaignState.PAUSED.value):
            raise CampaignConflict(
                f"campaign {campaign.name!r} is {campaign.state}; a winner is picked once it has launched",
                field="state",
            )
        names = [v["name"] for v in campaign.ab_test["variants"]]
        if variant is not None and variant not in names:
            raise InvalidInput(f"no variant named {variant!r} (the variants: {', '.join(names)})", field="variant")
        found = ab_tests.report(session.connection(), campaign)
        now = utcnow()
        ab_tests.declare_winner(campaign, variant or found["leader"], now)
        owner = hand_fan_out(campaign, now) if campaign.state == CampaignState.SENDING.value else None
        campaign_id = campaign.id
        found.update(winner=campaign.ab_winner, decided_at=now)
    if owner is not None:
        _publish_fan_out(campaign_id, owner)
    return found


__all__ = [
    "ab_report",
    "pick_ab_winner",
    "EDITABLE",
    "UTM_KEYS",
    "CampaignConflict",
    "CampaignStatus",
    "as_dict",
    "audience_query",
    "campaign_status",
    "cancel_campaign",
    "check_utm",
    "create_campaign",
    "fan_out",
    "get_campaign",
    "launch_campaign",
    "list_campaigns",
    "parse_window",
    "pause_campaign",
    "resume_campaign",
    "run_due",
    "schedule_campaign",
    "update_campaign",
    "window_opens",
]
