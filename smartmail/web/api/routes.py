"""Every /v1 router, mounted in one place (a new resource adds its module here)."""

from __future__ import annotations

from fastapi import APIRouter

from smartmail.web.api import (
    analytics,
    campaigns,
    contacts,
    events,
    imports,
    inbound,
    keys,
    lists,
    messages,
    segments,
    suppressions,
    templates,
    webhooks,
    workflows,
)

router = APIRouter(prefix="/v1")
for module in (
    messages,
    templates,
    contacts,
    lists,
    imports,
    segments,
    events,
    suppressions,
    campaigns,
    inbound,
    keys,
    webhooks,
    workflows,
    analytics,
):
    router.include_router(module.router)
