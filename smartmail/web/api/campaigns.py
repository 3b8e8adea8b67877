"""/v1/campaigns: create, list, read and change campaigns; schedule, launch, pause, resume, cancel; progress."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.campaigns import lifecycle
from smartmail.errors import InvalidInput
from smartmail.feedback import stats
from smartmail.store.models import CampaignState
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/campaigns", tags=["campaigns"])

Reader = Annotated[Principal, Security(authorize, scopes=["campaigns:read"])]
Writer = Annotated[Principal, Security(authorize, scopes=["campaigns:write"])]
# `:path`, so a name holding a `/` (URL-encoded as %2F, which the server decodes) still routes;
# the routes with a suffix (/launch, /progress, …) are declared before the bare one.
Name = Annotated[str, Path(min_length=1, max_length=200, description="The campaign's name (URL-encoded), or its id.")]
# The domain names a few settings as Python does; the body's key is what a client can point at.
_BODY_KEYS = {"from_": "from", "audience": "lists"}


class VariantIn(BaseModel):
    """One variant of an A/B test; a setting left out is the campaign's."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=32, description="Default: A, B, C… by position.")
    subject: str | None = Field(None, max_length=998, description="The subject (Jinja allowed).")
    template: str | None = Field(None, max_length=200, description="Another template, frozen at launch.")
    from_name: str | None = Field(None, max_length=200, description="The sender's display name; the address stays.")
    send_at: datetime | None = Field(None, description="When this variant's messages go (ISO 8601; naive: UTC).")


class AbTestIn(BaseModel):
    """An A/B test: see docs/ab-tests.md."""

    model_config = ConfigDict(extra="forbid")

    variants: list[VariantIn] = Field(description="2-5 variants.")
    test_share: float | str = Field(description='The share of the audience in the test: 0.2 or "20%".')
    metric: str | None = Field(None, description="opens (default), clicks or conversions: unique human ones.")
    conversion_event: str | None = Field(None, max_length=64, description="The custom event that is a conversion.")
    conversion_hours: float | None = Field(None, description="Within how many hours of a click (default 24).")
    duration: int | str = Field(description='How long the test runs: seconds or "4h", "90m", "1d".')
    auto_winner: bool | None = Field(None, description="Beat picks the winner when the test is over (default true).")
    seed: int | None = Field(None, description="The split's seed (default: random, kept on the campaign).")


class _Settings(BaseModel):
    """A campaign's settings but its template; in a PATCH, the keys given replace their values."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lists: list[str] | None = Field(None, max_length=100, description="Lists whose subscribed members receive it.")
    segment: str | None = Field(None, max_length=200, description="A saved segment whose contacts receive it.")
    from_: str | None = Field(None, alias="from", max_length=320, description="Default: SMARTMAIL_DEFAULT_SENDER.")
    reply_to: str | None = Field(None, max_length=320)
    send_at: datetime | None = Field(
        None, description="Start then (ISO 8601; without an offset, UTC): the campaign is scheduled; null: a draft."
    )
    window: str | None = Field(None, max_length=11, description='Daily send window, "08:00-20:00" (may wrap midnight).')
    window_timezone: str | None = Field(None, max_length=64, description="The window's zone for contacts without one.")
    rate_cap: float | None = Field(None, allow_inf_nan=False, description="Messages per second, campaign-wide.")
    tags: list[str] | None = Field(None, max_length=20)
    resend_unknown: bool | None = Field(
        None, description="At-least-once: re-send messages a worker crash left `unknown` (duplicates possible)."
    )
    tracking: bool | None = Field(None, description="Open and click tracking (default true).")
    utm: dict[str, str] | None = Field(
        None,
        max_length=len(lifecycle.UTM_KEYS),
        description="UTM parameters added to tracked links: keys among "
        + ", ".join(f"`{key}`" for key in lifecycle.UTM_KEYS)
        + "; values of 1-200 printable characters.",
    )
    preheader: str | None = Field(
        None, max_length=1000, description="Hidden preview text (Jinja allowed); replaces the template's."
    )
    ab_test: AbTestIn | None = Field(None, description="An A/B test of 2-5 variants (docs/ab-tests.md); null: none.")

    def settings(self) -> dict[str, Any]:
        """The keys the client sent, named as lifecycle.EDITABLE names them."""
        settings = self.model_dump(exclude_unset=True)
        if self.ab_test is not None:  # the test's own keys as sent: its defaults are the domain's
            settings["ab_test"] = self.ab_test.model_dump(exclude_unset=True)
        return settings


_TEMPLATE = "A template name, `NAME` or `NAME@VERSION`."


class CampaignIn(_Settings):
    name: str = Field(min_length=1, max_length=200)
    template: str = Field(max_length=200, description=_TEMPLATE)


class CampaignChange(_Settings):
    template: str | None = Field(None, max_length=200, description=_TEMPLATE)


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    send_at: datetime = Field(description="ISO 8601; without an offset, UTC.")


class CampaignOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int
    name: str
    state: CampaignState
    template: str
    template_version: int | None = Field(description="The version frozen at launch (null for a file template).")
    lists: list[str]
    segment: str | None
    from_: str = Field(alias="from")
    reply_to: str | None
    send_at: UtcDateTime | None
    window: str | None
    window_timezone: str
    rate_cap: float | None
    tags: list[str]
    resend_unknown: bool
    tracking: bool
    utm: dict[str, str] | None
    preheader: str | None
    fanned_out: bool = Field(description="Every audience contact has its message.")
    hard_bounces: int = Field(description="Hard bounces reported after delivery (DSNs, provider notifications).")
    soft_bounces: int
    complaints: int = Field(description="Spam complaints (ARF reports, provider feedback loops).")
    paused_reason: str | None = Field(
        description="Why the campaign paused itself (complaint or bounce rate), if it did."
    )
    ab_test: dict[str, Any] | None = Field(description="Its A/B test's settings (with the split's seed), if any.")
    ab_decide_at: UtcDateTime | None = Field(description="When the test is over and its winner due.")
    ab_winner: str | None = Field(description="The winning variant, once picked.")
    ab_decided_at: UtcDateTime | None
    created_at: UtcDateTime
    launched_at: UtcDateTime | None
    finished_at: UtcDateTime | None


class ProgressOut(BaseModel):
    name: str
    state: CampaignState
    counts: dict[str, int] = Field(description="Messages per state.")
    total: int
    rate: float = Field(description="Messages sent per second over the last minute.")
    eta_seconds: float | None = Field(description="Time left at that rate; null while nothing is being sent.")
    fanned_out: bool
    feedback: dict[str, int] = Field(description="hard_bounces, soft_bounces and complaints reported after delivery.")
    paused_reason: str | None = Field(description="Why it paused itself (its complaint or bounce rate), if it did.")


class Counted(BaseModel):
    unique: int = Field(description="Messages with at least one.")
    total: int


class EngagementOut(BaseModel):
    denominator: str = Field(description="What the rates divide by.")
    sent: int
    opens: Counted
    clicks: Counted
    open_rate: float | None
    click_rate: float | None
    click_to_open_rate: float | None
    machine: dict[str, int] = Field(description="Opens and clicks by privacy proxies and link scanners.")
    include_machine: bool


class VariantReport(BaseModel):
    name: str
    subject: str | None
    template: str | None
    from_name: str | None
    send_at: str | None
    sent: int = Field(description="Its test messages sent (delivered; not bounced).")
    opens: int = Field(description="Of those, opened by a person (unique).")
    clicks: int = Field(description="Of those, clicked by a person (unique).")
    conversions: int | None = Field(
        description="Of those, converted: the conversion event within the hours after a click."
    )
    open_rate: float | None
    click_rate: float | None
    conversion_rate: float | None
    successes: int = Field(description="Its count of the test's metric.")
    rate: float | None = Field(description="Its rate of the test's metric.")
    z: float | None = Field(description="Two-proportion z against the leader (pooled).")
    p_value: float | None = Field(description="Two-sided.")
    significant: bool | None = Field(description="p < 0.05 against the leader; null for the leader.")
    verdict: str


class AbReportOut(BaseModel):
    campaign: str
    state: CampaignState
    metric: str
    conversion_event: str | None
    conversion_hours: float | None
    test_share: float
    duration: int = Field(description="Seconds.")
    auto_winner: bool
    seed: int
    decide_at: UtcDateTime | None
    winner: str | None
    decided_at: UtcDateTime | None
    leader: str = Field(description="The best rate of the metric; on a tie, the earliest variant.")
    significant: bool = Field(description="The leader is significantly ahead of every other variant.")
    conclusion: str
    variants: list[VariantReport]


class WinnerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: str | None = Field(None, max_length=32, description="The winner; default: the leader by the metric.")


@contextmanager
def _pointing_at_the_body() -> Iterator[None]:
    """Domain errors name settings as Python does; re-raised naming the body's key."""
    try:
        yield
    except InvalidInput as exc:
        if exc.field not in _BODY_KEYS:
            raise
        raise type(exc)(exc.reason, field=_BODY_KEYS[exc.field]) from None


@router.post("", status_code=201, response_model=CampaignOut)
def create_campaign(body: CampaignIn, response: Response, principal: Writer) -> dict[str, Any]:
    """Create a campaign: a draft, or scheduled when `send_at` is given. Give `lists`, a `segment`,
    or both; 422 names the first bad key (`/lists/0` for an unknown list), 409 if the name is taken."""
    # A null is a key left out: the default applies.
    settings = {key: value for key, value in body.settings().items() if value is not None}
    name = settings.pop("name")
    with _pointing_at_the_body():
        created = lifecycle.create_campaign(name, **settings)
    response.headers["Location"] = f"/v1/campaigns/{quote(created['name'], safe='')}"
    return created


@router.get("", response_model=Page[CampaignOut])
def list_campaigns(
    principal: Reader,
    limit: Limit = 100,
    cursor: Cursor = None,
    state: Annotated[CampaignState | None, Query(description="Only campaigns in this state.")] = None,
) -> Page[dict[str, Any]]:
    """Campaigns, newest first."""
    position = decode_cursor(cursor, (int,))
    rows = lifecycle.list_campaigns(
        limit=limit + 1, before=position[0] if position else None, state=state.value if state else None
    )
    return page(rows, limit, lambda row: [row["id"]])


@router.get("/{name}/engagement", response_model=EngagementOut)
def campaign_engagement(
    name: Name,
    principal: Reader,
    include_machine: Annotated[bool, Query(description="Count privacy-proxy opens and scanner clicks too.")] = False,
) -> dict[str, Any]:
    """Unique and total opens and clicks, and the rates over the messages sent; human hits only
    unless `include_machine`."""
    return stats.campaign_engagement(lifecycle.get_campaign(name)["id"], include_machine=include_machine)


@router.get("/{name}/progress", response_model=ProgressOut)
def campaign_progress(name: Name, principal: Reader) -> dict[str, Any]:
    """Messages per state, the send rate over the last minute and the time left at that rate."""
    status = lifecycle.campaign_status(name)
    return {
        "name": status.name,
        "state": status.state,
        "counts": status.counts,
        "total": status.total,
        "rate": status.rate,
        "eta_seconds": status.eta_seconds,
        "fanned_out": status.fanned_out,
        "feedback": status.feedback,
        "paused_reason": status.paused_reason,
    }


@router.get("/{name}/ab-report", response_model=AbReportOut)
def campaign_ab_report(name: Name, principal: Reader) -> dict[str, Any]:
    """An A/B campaign's test: each variant's sent, unique human opens and clicks, conversions and
    rates, and a two-proportion z-test of each against the leader, saying when a difference is not
    significant (p >= 0.05). 422 for a campaign without a test."""
    return lifecycle.ab_report(name)


@router.post("/{name}/ab-winner", response_model=AbReportOut)
def campaign_ab_winner(name: Name, principal: Writer, body: WinnerIn | None = None) -> dict[str, Any]:
    """Pick the winner now (`variant`, or the leader by the test's metric): the rest of the
    audience gets it. 409 if it has one already or has not launched; 422 for an unknown variant."""
    return lifecycle.pick_ab_winner(name, body.variant if body else None)


@router.post("/{name}/schedule", response_model=CampaignOut)
def schedule_campaign(name: Name, body: ScheduleIn, principal: Writer) -> dict[str, Any]:
    """Start a draft or scheduled campaign at `send_at` (409 in another state)."""
    lifecycle.schedule_campaign(name, body.send_at)
    return lifecycle.get_campaign(name)


@router.post("/{name}/launch", response_model=CampaignOut)
def launch_campaign(name: Name, principal: Writer) -> dict[str, Any]:
    """Start sending now: the template is frozen and the audience fanned out on the bulk queue
    (a draft or scheduled campaign; 409 otherwise). Follow it at `/progress`."""
    lifecycle.launch_campaign(name)
    return lifecycle.get_campaign(name)


@router.post("/{name}/pause", response_model=CampaignOut)
def pause_campaign(name: Name, principal: Writer) -> dict[str, Any]:
    """Stop a sending campaign: workers claim none of its messages until it is resumed (409 if not sending)."""
    lifecycle.pause_campaign(name)
    return lifecycle.get_campaign(name)


@router.post("/{name}/resume", response_model=CampaignOut)
def resume_campaign(name: Name, principal: Writer) -> dict[str, Any]:
    """Go on sending a paused campaign (409 if not paused)."""
    lifecycle.resume_campaign(name)
    return lifecycle.get_campaign(name)


@router.post("/{name}/cancel", response_model=CampaignOut)
def cancel_campaign(name: Name, principal: Writer) -> dict[str, Any]:
    """Send nothing more: unsent messages become `cancelled` (409 if sent or cancelled already)."""
    lifecycle.cancel_campaign(name)
    return lifecycle.get_campaign(name)


@router.get("/{name}", response_model=CampaignOut)
def get_campaign(name: Name, principal: Reader) -> dict[str, Any]:
    """One campaign, by name or id."""
    return lifecycle.get_campaign(name)


@router.patch("/{name}", response_model=CampaignOut)
def update_campaign(name: Name, body: CampaignChange, principal: Writer) -> dict[str, Any]:
    """Change a draft or scheduled campaign; keys left out keep their values, `null` clears one
    (`send_at: null` makes it a draft again). 409 once it has launched: the row is locked while
    it changes, so a launch at the same moment waits and sends the changed campaign."""
    with _pointing_at_the_body():
        return lifecycle.update_campaign(name, **body.settings())
