"""The deprecation mechanism on a test-only route: RFC 9745 `Deprecation`, RFC 8594 `Sunset`, a `Link`
to the successor, on every answer of the route, and `deprecated` in the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query
from fastapi.testclient import TestClient

from smartmail.web import problems
from smartmail.web.api.deprecation import deprecated
from smartmail.web.request_context import RequestContext

SINCE = datetime(2027, 1, 1, tzinfo=UTC)
SUNSET = datetime(2027, 7, 1, 12, 30, tzinfo=UTC)


def _app() -> FastAPI:
    """The app's error handlers and the middleware that adds headers left by dependencies."""
    app = FastAPI()
    problems.install(app)
    app.add_middleware(RequestContext)
    router = APIRouter(prefix="/v1")

    @router.get(
        "/old/{name}",
        deprecated=True,
        dependencies=[Depends(deprecated(SINCE, sunset=SUNSET, successor="/v1/new"))],
    )
    def old(name: str, limit: int = Query(10, ge=1)) -> dict[str, str]:
        if name == "missing":
            raise HTTPException(404, "No such thing.")
        return {"name": name}

    @router.get("/new/{name}")
    def new(name: str) -> dict[str, str]:
        return {"name": name}

    app.include_router(router)
    return app


def test_a_deprecated_route_says_so_on_every_answer():
    client = TestClient(_app())
    answers = [client.get("/v1/old/x"), client.get("/v1/old/missing"), client.get("/v1/old/x?limit=0")]
    assert [a.status_code for a in answers] == [200, 404, 422]
    for answer in answers:
        assert answer.headers["deprecation"] == f"@{int(SINCE.timestamp())}" == "@1798761600"
        assert answer.headers["sunset"] == "Thu, 01 Jul 2027 12:30:00 GMT"
        assert answer.headers["link"] == '</v1/new>; rel="successor-version"'
    assert answers[1].headers["content-type"] == "application/problem+json"


def test_its_successor_and_the_document():
    app = _app()
    current = TestClient(app).get("/v1/new/x")
    assert current.status_code == 200
    assert not {"deprecation", "sunset", "link"} & set(current.headers)
    paths = app.openapi()["paths"]
    assert paths["/v1/old/{name}"]["get"]["deprecated"] is True
    assert "deprecated" not in paths["/v1/new/{name}"]["get"]


def test_without_a_sunset_or_successor_only_deprecation():
    app = FastAPI()
    app.add_middleware(RequestContext)
    app.get("/v1/thing", dependencies=[Depends(deprecated(SINCE))])(lambda: {})
    answer = TestClient(app).get("/v1/thing")
    assert answer.headers["deprecation"] == "@1798761600"
    assert "sunset" not in answer.headers and "link" not in answer.headers
