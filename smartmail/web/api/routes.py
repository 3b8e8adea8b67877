"""Every /v1 router, mounted in one place (a new resource adds its module here)."""

from __future__ import annotations

from fastapi import APIRouter

from smartmail.web.api import imports, messages

router = APIRouter(prefix="/v1")
for module in (messages, imports):
    router.include_router(module.router)
