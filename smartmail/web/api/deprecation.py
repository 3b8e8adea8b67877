"""Marking an endpoint deprecated: `Deprecation` (RFC 9745), `Sunset` (RFC 8594) and a `Link` to its successor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from email.utils import format_datetime

from fastapi import Request

from smartmail.web.request_context import add_response_headers


def deprecated(since: datetime, *, sunset: datetime | None = None, successor: str | None = None) -> Callable:
    """A route dependency: `dependencies=[Depends(deprecated(...))]` plus `deprecated=True` on the route
    (which marks it in the OpenAPI document). Times are UTC."""
    headers = {"Deprecation": f"@{int(since.timestamp())}"}
    if sunset is not None:
        headers["Sunset"] = format_datetime(sunset, usegmt=True)
    if successor is not None:
        headers["Link"] = f'<{successor}>; rel="successor-version"'

    def mark(request: Request) -> None:
        add_response_headers(request.scope.setdefault("state", {}), headers)

    return mark
