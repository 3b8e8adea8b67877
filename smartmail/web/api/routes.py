"""Every /v1 router, mounted in one place (a new resource adds its module here)."""

from __future__ import annotations

from fastapi import APIRouter

from smartmail.web.api import campaigns, imports, keys, messages, segments, suppressions, templates

router = APIRouter(prefix="/v1")
for module in (messages, templates, imports, segments, suppressions, campaigns, keys):
    router.include_router(module.router)
