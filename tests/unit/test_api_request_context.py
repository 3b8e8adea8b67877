"""Request ids on an app with a failing route: an unexpected error still answers and logs with its id."""

from __future__ import annotations

import logging

import pytest
import structlog
from fastapi import FastAPI
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from smartmail.web import problems, request_context
from smartmail.web.request_context import RequestContext


@pytest.fixture(autouse=True)
def _info_lines_captured(monkeypatch):
    # An earlier test may have configured a higher level, and loggers it used under
    # cache_logger_on_first_use keep their processors, which capture_logs then cannot replace.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    for module in (problems, request_context):
        monkeypatch.setattr(module, "log", structlog.get_logger("smartmail.web"))
    yield
    structlog.configure(**saved)


def _app() -> FastAPI:
    app = FastAPI()
    problems.install(app)
    app.add_middleware(RequestContext)

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("sm_0123456789abcdef_" + "A" * 43)

    @app.get("/v1/fine")
    def fine() -> dict[str, bool]:
        return {"ok": True}

    return app


def test_a_500_carries_the_request_id_in_its_answer_and_its_log_line():
    client = TestClient(_app(), raise_server_exceptions=False)
    with capture_logs() as logs:
        response = client.get("/v1/boom", headers={"X-Request-Id": "req-500"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "req-500"
    assert "sm_0123456789abcdef" not in response.text  # the exception's text is logged, never answered
    logged = {entry["event"]: entry for entry in logs}
    assert logged["web.unexpected_error"]["request_id"] == "req-500"
    assert logged["web.request"]["status"] == 500


def test_a_request_id_is_made_when_absent_or_unfit():
    client = TestClient(_app())
    made = {client.get("/v1/fine").headers["x-request-id"] for _ in range(3)}
    assert len(made) == 3 and all(len(i) == 32 for i in made)
    token = "sm_0123456789abcdef_" + "A" * 43
    assert client.get("/v1/fine", headers={"X-Request-Id": token}).headers["x-request-id"] != token
    assert client.get("/v1/fine", headers={"X-Request-Id": "a.b_c:d-1"}).headers["x-request-id"] == "a.b_c:d-1"


def test_the_logged_path_names_no_address():
    client = TestClient(_app())
    with capture_logs() as logs:
        client.get("/v1/contacts/ann.lee%2Btag@example.org")
    assert [entry["path"] for entry in logs if entry["event"] == "web.request"] == ["/v1/contacts/*@example.org"]
