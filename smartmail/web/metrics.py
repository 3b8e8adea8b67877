"""GET /metrics: the operator metrics in Prometheus text format, open unless SMARTMAIL_METRICS_TOKEN is set."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response

from smartmail.config import get_settings
from smartmail.web.problems import COMMON_HEADERS, problem
from smartmail.workers import metrics

router = APIRouter(include_in_schema=False)


def _authorized(request: Request, token: str) -> bool:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


@router.get("/metrics")
def scrape(request: Request) -> Response:
    """Every process's counters (the multiprocess directory) and the backlogs read now. Sync: the
    backlog gauges ask Redis and the database."""
    token = get_settings().metrics_token
    if token and not _authorized(request, token):
        # RFC 6750 section 3: the challenge names the scheme Prometheus's `authorization` sends.
        return problem(
            401,
            "send the metrics token: `Authorization: Bearer <token>`.",
            headers={"WWW-Authenticate": 'Bearer realm="smartmail-metrics"'},
        )
    return Response(
        metrics.exposition(), media_type=metrics.CONTENT_TYPE, headers={**COMMON_HEADERS, "Cache-Control": "no-store"}
    )
