"""Stream positions and type filters as text, and the lines `smartmail events tail` prints."""

from __future__ import annotations

import json

import pytest

from smartmail.audience.event_stream import START, Position, check_limit, check_types
from smartmail.cli.events import Format, _line
from smartmail.errors import InvalidInput

EVENT = {
    "id": 7,
    "position": "812-7",
    "type": "opened",
    "occurred_at": "2026-12-04T10:00:00Z",
    "message_id": "01JEXAMPLE0000000000000000",
    "contact_id": 3,
    "email": "ann@example.org",
    "campaign_id": 2,
    "machine": True,
    "properties": {"user_agent": "GoogleImageProxy", "ip": "192.0.2.0"},
}


@pytest.mark.parametrize("position", [Position(0, 1), Position(812, 7), Position(2**63 - 1, 2**63 - 1), START])
def test_a_position_reads_back_as_itself(position):
    assert Position.parse(str(position)) == position


@pytest.mark.parametrize("value", ["", "7", "-1-7", "1--7", "1-7-9", "x-7", "1-7 ", "١-٧", str(2**63) + "-1", None, 7])
def test_a_bad_position_names_its_field(value):
    with pytest.raises(InvalidInput) as caught:
        Position.parse(value, field="cursor")
    assert caught.value.field == "cursor"


def test_positions_order_as_the_stream_does():
    assert Position(1, 900) < Position(2, 5) < Position(2, 6)


def test_types_are_names_and_none_means_all():
    assert check_types(None) is None and check_types([]) is None
    assert check_types(["opened", "order_placed", "opened"]) == ["opened", "order_placed"]
    with pytest.raises(InvalidInput) as caught:
        check_types(["opened", "two words"])
    assert caught.value.field == "type[1]"
    with pytest.raises(InvalidInput) as caught:
        check_limit(1001)
    assert caught.value.field == "limit"


def test_a_text_line_starts_with_the_position_and_a_json_line_is_the_event():
    assert _line(EVENT, Format.text).split("  ") == [
        "812-7",
        "2026-12-04T10:00:00Z",
        "opened",
        "ann@example.org",
        "message=01JEXAMPLE0000000000000000",
        "campaign=2",
        "machine",
        '{"user_agent":"GoogleImageProxy","ip":"192.0.2.0"}',
    ]
    bare = {**EVENT, "email": None, "message_id": None, "campaign_id": None, "machine": False, "properties": {}}
    assert _line(bare, Format.text) == "812-7  2026-12-04T10:00:00Z  opened  -"
    assert json.loads(_line(EVENT, Format.json)) == EVENT
