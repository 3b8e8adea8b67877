"""Interactive API docs at /docs: Swagger UI from our own origin (the files fastapi-offline bundles), never a CDN."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(fastapi_offline.__file__).parent / "static"


def _page(openapi_url: str, title: str) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} API",
        swagger_js_url="/docs/static/swagger-ui-bundle.js",
        swagger_css_url="/docs/static/swagger-ui.css",
        swagger_favicon_url="/docs/static/favicon.png",
    )
    html = bytes(page.body).decode()
    # The page's one inline script (it starts Swagger UI) is allowed by its hash, nothing else inline;
    # Swagger UI styles elements through style attributes, hence 'unsafe-inline' for styles only.
    inline = re.findall(r"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)
    csp = (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": csp})


def install(app: FastAPI) -> None:
    openapi_url = app.openapi_url or "/v1/openapi.json"
    app.mount("/docs/static", StaticFiles(directory=STATIC), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return _page(openapi_url, app.title)
