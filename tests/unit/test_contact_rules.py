"""The rules contacts are checked and written by: the status a bulk write leaves, storable strings."""

from __future__ import annotations

import pytest

from smartmail.audience.contacts import bulk_status, check_storable
from smartmail.errors import InvalidInput


@pytest.mark.parametrize(
    ("requested", "current", "suppressed_as", "expected"),
    [
        (None, None, None, "subscribed"),  # a new contact
        ("unsubscribed", None, None, "unsubscribed"),
        (None, None, "hard_bounce", "bounced"),  # a new contact whose address bounced before
        ("subscribed", None, "complaint", "complained"),  # a bulk write never lifts a suppression
        (None, None, "erased", "blocked"),
        ("subscribed", "unsubscribed", None, "unsubscribed"),  # never resubscribes
        (None, "complained", None, "complained"),
        ("bounced", "unsubscribed", None, "bounced"),  # away from mailable, yes
        ("unsubscribed", "subscribed", None, "unsubscribed"),
        (None, "subscribed", None, "subscribed"),
    ],
)
def test_bulk_status(requested, current, suppressed_as, expected):
    assert bulk_status(requested, current, suppressed_as) == expected


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("a\x00b", "attributes.k"),
        ({"k": ["ok", "\ud800"]}, "attributes.k"),
        ({"\x00": 1}, "attributes"),
        ({"n": {"m": "\udfff"}}, "attributes.n.m"),
    ],
)
def test_unstorable_strings_are_refused_by_field(value, field):
    with pytest.raises(InvalidInput) as raised:
        check_storable(value, "attributes.k" if isinstance(value, str) else "attributes")
    assert raised.value.field == field


def test_storable_strings_pass():
    check_storable({"emoji": "\U0001f600", "nested": [{"é": "ü"}], "n": 1, "none": None}, "attributes")
