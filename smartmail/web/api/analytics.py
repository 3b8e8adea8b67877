"""/v1/analytics: a campaign's KPIs and trends over time, from the roll-ups."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Security
from pydantic import BaseModel, Field

from smartmail.access.keys import Principal
from smartmail.analytics import kpis, trends
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import as_stored, utcnow
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime

router = APIRouter(prefix="/analytics", tags=["analytics"])

Reader = Annotated[Principal, Security(authorize, scopes=["analytics:read"])]


class KpiOut(BaseModel):
    value: float | None = Field(description="numerator / denominator; null when the denominator is 0.")
    numerator: int
    denominator: int
    numerator_is: str = Field(description="What the numerator counts.")
    denominator_is: str = Field(description="What the denominator counts.")


class CampaignRef(BaseModel):
    id: int
    name: str
    state: str


class CampaignKpisOut(BaseModel):
    campaign: CampaignRef
    counts: dict[str, int] = Field(
        description="The rolled-up counters over the campaign's life (sent, deferred, failed, bounced_hard, "
        "bounced_soft, opened_* and clicked_* for people and machines, unsubscribed, complained); one never "
        "counted is absent."
    )
    kpis: dict[str, KpiOut] = Field(
        description="delivery, bounce, open, click-through, click-to-open, "
        "unsubscribe and complaint rates, each with its numerator and denominator."
    )


class BucketOut(BaseModel):
    start: UtcDateTime = Field(description="The hour or day's start (UTC).")
    counts: dict[str, int]
    kpis: dict[str, KpiOut]


class TrendsOut(BaseModel):
    campaign: CampaignRef | None = Field(description="The campaign asked for; null: all mail (or the tag's).")
    tag: str | None = Field(None, description="The tag asked for; null: all mail (or the campaign's).")
    granularity: Literal["hour", "day"]
    since: UtcDateTime = Field(description="The first bucket's start.")
    until: UtcDateTime = Field(description="The last bucket's end.")
    counts: dict[str, int] = Field(description="The period's counters.")
    kpis: dict[str, KpiOut] = Field(description="The period's KPIs.")
    series: list[BucketOut] = Field(description="Each hour or day, oldest first; those without mail have zeros.")


@router.get("/campaigns/{name}", response_model=CampaignKpisOut)
def campaign_kpis(
    name: Annotated[str, Path(min_length=1, max_length=200, description="The campaign's name (or id).")],
    principal: Reader,
) -> dict[str, Any]:
    """A campaign's KPIs over its life, with the counters and the numerator and denominator of each rate."""
    campaign = trends.find_campaign(name)
    found = kpis.campaign_kpis(campaign["id"])
    return {"campaign": campaign, "counts": found["counts"], "kpis": found["kpis"]}


@router.get("/trends", response_model=TrendsOut)
def trends_over_time(
    principal: Reader,
    since: Annotated[
        datetime | None, Query(description="From the bucket holding this time; default 30 days ago.")
    ] = None,
    until: Annotated[datetime | None, Query(description="To the bucket holding this time; default now.")] = None,
    granularity: Annotated[Literal["hour", "day"], Query(description="One bucket per hour or per day.")] = "day",
    campaign: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Only this campaign's mail (name or id).")
    ] = None,
    tag: Annotated[
        str | None, Query(min_length=1, max_length=64, description="Only the messages with this tag.")
    ] = None,
) -> dict[str, Any]:
    """Counters and KPIs per hour or day (at most 2,000 buckets), and over the whole period; an unknown
    campaign is a 422 naming `campaign`."""
    start = as_stored(since) if since is not None else utcnow() - timedelta(days=30)
    try:
        return trends.trends_report(since=start, until=until, granularity=granularity, campaign=campaign, tag=tag)
    except NotFound as exc:  # an unknown campaign in the URL's path is a 404; in a parameter, a bad parameter
        raise InvalidInput(str(exc), field="campaign") from exc
