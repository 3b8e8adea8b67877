"""Bench-only ASGI apps for scripts/bench_tracking.py: the click's 302 with none of the tracking work.

`bare` is a FastAPI app with one route, GET /bench-bare/{token}, answering the same 302 (same
headers) to a fixed URL; `in_app` is the product app (create_app(): its middleware) plus that route.
Served like `smartmail web` (`uvicorn bench_tracking_app:bare --app-dir scripts --workers 2`);
never part of the product.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

BARE_PREFIX = "/bench-bare/"
TARGET = "https://example.com/login"
# What smartmail.web.tracking's click answers with.
_HEADERS = {"Cache-Control": "no-store, max-age=0", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}


async def redirect(token: str) -> RedirectResponse:
    return RedirectResponse(TARGET, status_code=302, headers=_HEADERS)


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


bare = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
bare.add_api_route(BARE_PREFIX + "{token}", redirect, methods=["GET"])
bare.add_api_route("/healthz", healthz, methods=["GET"])


def _in_app() -> FastAPI:
    from smartmail.web.app import create_app

    app = create_app()
    app.add_api_route(BARE_PREFIX + "{token}", redirect, methods=["GET"], include_in_schema=False)
    return app


def __getattr__(name: str) -> FastAPI:  # `in_app` is built only when uvicorn asks for it
    if name == "in_app":
        return _in_app()
    raise AttributeError(name)
