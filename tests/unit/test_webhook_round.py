"""A round of webhook requests on httpx's in-memory transport, and the endpoint health rules with a fixed clock."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from types import SimpleNamespace

import httpx
import pytest

from smartmail.webhooks import sending
from smartmail.webhooks.drain import health_changes

NOW = datetime(2026, 12, 4, 12, 0, 0)


def _answer(status: int, body: bytes = b"") -> httpx.Response:
    return httpx.Response(status, stream=httpx.ByteStream(body))  # streamed, as from a server


def _requests(count: int) -> list[sending.Request]:
    return [sending.Request(f"msg_{i}", (i,), b'{"type":"signup"}') for i in range(count)]


def _run(answer, count: int, **options) -> tuple[list[tuple[sending.Request, sending.Outcome]], list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(len(seen), request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            settings = {"max_in_flight": 1, "pacer": sending.Pacer(None), "total_timeout": 5.0}
            settings |= {"max_response_bytes": 64 * 1024, "give_up_after": 3} | options
            round_ = sending.Round(http, "https://hooks.example.com/in", ["whsec_" + "A" * 44], **settings)
            return [item async for item in round_.completed(_requests(count))]

    return asyncio.run(go()), seen


def test_every_request_is_signed_and_yields_its_outcome():
    completed, seen = _run(lambda n, request: _answer(200, b"thanks"), 5)
    assert [outcome.status for _, outcome in completed] == [200] * 5
    assert sorted(request.headers["webhook-id"] for request in seen) == [f"msg_{i}" for i in range(5)]
    assert all(request.headers["webhook-signature"].startswith("v1,") for request in seen)
    assert completed[0][1].response == "thanks"


def test_failures_in_a_row_leave_the_rest_of_the_round_unsent():
    completed, seen = _run(lambda n, request: _answer(503), 10)
    assert len(seen) == len(completed) == 3  # give_up_after


def test_a_410_ends_the_round():
    completed, seen = _run(lambda n, request: _answer(410 if n == 2 else 200), 10)
    assert [outcome.status for _, outcome in completed] == [200, 410]


def test_no_request_starts_after_the_deadline():
    completed, seen = _run(lambda n, request: _answer(200), 10, deadline=time.monotonic() - 1)
    assert completed == [] and seen == []


def test_an_unexpected_error_is_the_attempts_error_and_the_round_goes_on():
    def answer(n, request):
        if n == 1:
            raise RuntimeError("h2 state machine confused")
        return _answer(200)

    completed, _ = _run(answer, 3)
    assert [(outcome.status, outcome.error) for _, outcome in completed] == [
        (None, "RuntimeError: h2 state machine confused"),
        (200, None),
        (200, None),
    ]


def test_an_answer_is_read_up_to_the_cap_and_kept_as_storable_text():
    completed, _ = _run(lambda n, request: _answer(200, b"ok\x00" + b"x" * 5000), 1, max_response_bytes=100)
    ((_, outcome),) = completed
    assert outcome.response == "ok\ufffd" + "x" * 97


def _endpoint(**columns):
    values = {
        "enabled": True,
        "consecutive_failures": 0,
        "failing_since": None,
        "circuit_open_until": None,
        "circuit_pause": None,
    }
    return SimpleNamespace(**(values | columns))


def _outcomes(*statuses):
    return [sending.Outcome(status, None if status else "no answer within 15 s", 5, None) for status in statuses]


@pytest.fixture
def settings(settings_env):
    settings_env.setenv("SMARTMAIL_WEBHOOK_CIRCUIT_FAILURES", "5")
    settings_env.setenv("SMARTMAIL_WEBHOOK_CIRCUIT_SECONDS", "30")


def test_a_success_clears_the_streak_and_closes_the_circuit(settings):
    changes, reason = health_changes(_endpoint(consecutive_failures=9, circuit_pause=60.0), _outcomes(500, 200), NOW)
    assert changes["consecutive_failures"] == 0 and changes["circuit_open_until"] is None and reason == ""
    assert changes["last_success_at"] == NOW and changes["circuit_pause"] is None


def test_failures_past_the_setting_open_the_circuit_and_failed_probes_double_its_pause(settings):
    changes, _ = health_changes(_endpoint(consecutive_failures=3), _outcomes(500, None), NOW)
    assert changes["consecutive_failures"] == 5 and changes["circuit_open_until"] == NOW + timedelta(seconds=30)
    assert changes["failing_since"] == NOW
    probe = _endpoint(consecutive_failures=5, circuit_pause=30.0, circuit_open_until=NOW - timedelta(seconds=1))
    changes, _ = health_changes(probe, _outcomes(503), NOW)
    assert changes["circuit_pause"] == 60 and changes["circuit_open_until"] == NOW + timedelta(seconds=60)
    longest = _endpoint(consecutive_failures=50, circuit_pause=500.0, circuit_open_until=NOW - timedelta(seconds=1))
    assert health_changes(longest, _outcomes(503), NOW)[0]["circuit_pause"] == 600  # at most 10 minutes


def test_stragglers_of_a_round_do_not_reopen_an_open_circuit(settings):
    still_open = _endpoint(consecutive_failures=5, circuit_pause=30.0, circuit_open_until=NOW + timedelta(seconds=20))
    changes, _ = health_changes(still_open, _outcomes(500, 500), NOW)
    assert "circuit_open_until" not in changes and changes["consecutive_failures"] == 7


def test_410_or_failing_for_days_disables_an_enabled_endpoint_once(settings):
    assert health_changes(_endpoint(), _outcomes(410), NOW)[1] == "the endpoint answered 410 Gone"
    long_failing = _endpoint(failing_since=NOW - timedelta(days=5, seconds=1))
    changes, reason = health_changes(long_failing, _outcomes(None), NOW)
    assert reason.startswith("every attempt failed since") and changes["enabled"] is False
    assert health_changes(_endpoint(failing_since=NOW - timedelta(days=4)), _outcomes(500), NOW)[1] == ""
    assert health_changes(_endpoint(enabled=False), _outcomes(410), NOW)[1] == ""  # disabled already


def test_a_pacer_spaces_starts_and_never_waits_past_a_deadline():
    async def go():
        pacer = sending.Pacer(20.0)  # 50 ms apart
        started = time.monotonic()
        assert await pacer.wait() and await pacer.wait()
        waited = time.monotonic() - started
        assert not await pacer.wait(deadline=time.monotonic())  # the next start is 50 ms away
        return waited, pacer.next_start - time.monotonic()

    waited, ahead = asyncio.run(go())
    assert 0.04 <= waited < 0.2 and 0 < ahead <= 0.05  # the refused start is still the next one
