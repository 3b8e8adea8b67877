"""Ids on log lines: a caller's request id kept only when plain; a delivery outcome's message, campaign, contact."""

from __future__ import annotations

import logging

import pytest
import structlog
from structlog.testing import capture_logs

from smartmail.web.request_context import request_id_of
from smartmail.workers import delivery
from smartmail.workers.outcomes import Reply


def _scope(value: bytes) -> dict:
    return {"headers": [(b"x-request-id", value)]}


@pytest.mark.parametrize(
    "value",
    [
        b"trail-42",
        b"0af7651916cd43dd8448eb211c80319c",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # W3C traceparent
        b"dGhlIHNhbXBsZQ==",  # base64
        b"a" * 128,
    ],
)
def test_a_plain_request_id_up_to_128_characters_is_kept(value):
    assert request_id_of(_scope(value)) == value.decode()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"a" * 129,
        b"two words",
        b'quote"d',
        b"line\x00nul",
        b"tab\tbed",
        "caf\u00e9".encode("latin-1"),
        b"sm_0123456789abcdef_" + b"A" * 43,  # an API key sent as an id would be logged: never kept
    ],
)
def test_an_unfit_request_id_is_replaced_by_a_new_one(value):
    made = request_id_of(_scope(value))
    assert made != value.decode("latin-1") and len(made) == 32 and int(made, 16) >= 0


def test_no_header_makes_a_new_id_each_time():
    assert len({request_id_of({"headers": []}) for _ in range(3)}) == 3


@pytest.fixture
def info_logs(monkeypatch):
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    monkeypatch.setattr(delivery, "log", structlog.get_logger("smartmail.delivery"))
    monkeypatch.setattr(delivery, "enqueue_later", lambda wake, stream: None)
    with capture_logs() as logs:
        yield logs
    structlog.configure(**saved)


def test_every_outcome_is_one_line_with_its_ids_held_back_ones_too(info_logs):
    sent = delivery._Result("m1", "a@example.org", delivery.MessageState.SENT, Reply(250, "2.0.0 Ok"), site="x")
    sent.campaign_id, sent.contact_id = 7, 70
    held = delivery._Result(
        "m2", "b@example.org", delivery.MessageState.DEFERRED, Reply(None, "throttled"), attempted=False
    )
    delivery._after_recording([sent, held], delivery.DeliveryReport(), "bulk")
    lines = [line for line in info_logs if line["event"] == "message.outcome"]
    assert [(line["message_id"], line["state"], line["smtp_code"]) for line in lines] == [
        ("m1", "sent", 250),
        ("m2", "deferred", None),
    ]
    assert (lines[0]["campaign_id"], lines[0]["contact_id"], lines[1]["attempted"]) == (7, 70, False)
