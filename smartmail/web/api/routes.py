"""Every /v1 router, mounted in one place (a new resource adds its module here)."""

from __future__ import annotations

from fastapi import APIRouter

from smartmail.web.api import contacts, events, lists, messages

router = APIRouter(prefix="/v1")
for module in (messages, contacts, lists, events):
    router.include_router(module.router)
