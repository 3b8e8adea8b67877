"""Segment rule parsing: every malformed rule is refused with the path of the bad part."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from smartmail.audience import segments
from smartmail.audience.segments import InvalidSegment

BAD = [
    (
        {"all": [{"status": "subscribed"}, {"list": "a"}, {"attr": "x", "op": "eqq", "value": 1}]},
        "rules.all[2].op",
        "unknown operator 'eqq'",
    ),
    ([], "rules", "a rule must be a JSON object"),
    ({"all": []}, "rules.all", "non-empty list"),
    ({"any": "x"}, "rules.any", "non-empty list"),
    ({"all": [{"any": [{"not": {"wat": 1}}]}]}, "rules.all[0].any[0].not", "unknown rule ('wat')"),
    ({}, "rules", "unknown rule (nothing)"),
    ({"all": [{"list": "a"}], "any": []}, "rules.any", "unexpected key 'any'"),
    ({"attr": "x", "op": "eq"}, "rules.value", "eq needs a value"),
    ({"attr": 'a"b', "op": "eq", "value": 1}, "rules.attr", "not a valid attribute name"),
    ({"attr": "", "op": "eq", "value": 1}, "rules.attr", "not a valid attribute name"),
    ({"attr": "x", "op": "eq", "value": {"a": 1}}, "rules.value", "takes a string, a number or a boolean"),
    ({"attr": "x", "op": "eq", "value": None}, "rules.value", "takes a string, a number or a boolean"),
    ({"attr": "x", "op": "eq", "value": float("nan")}, "rules.value", "takes a string"),
    ({"attr": "x", "op": "in", "value": []}, "rules.value", "non-empty list"),
    ({"attr": "x", "op": "in", "value": [[1]]}, "rules.value", "non-empty list"),
    ({"attr": "x", "op": "gt", "value": True}, "rules.value", "not booleans"),
    ({"attr": "x", "op": "exists", "value": "yes"}, "rules.value", "true or false"),
    ({"attr": "x", "op": "gt", "value": "2024-13-01", "type": "date"}, "rules.value", "not an ISO 8601 date"),
    ({"attr": "x", "op": "in", "value": ["2024-01-01", "soon"], "type": "date"}, "rules.value[1]", "ISO 8601"),
    ({"attr": "x", "op": "gt", "value": "2024-01-01", "type": "money"}, "rules.type", "unknown type 'money'"),
    ({"attr": "x", "op": "eq", "value": 1, "extra": 2}, "rules.extra", "unexpected key 'extra'"),
    ({"status": "happy"}, "rules.status", "not one of"),
    ({"status": ["subscribed", "sad"]}, "rules.status[1]", "not one of"),
    ({"list": ""}, "rules.list", "must be a list name"),
    ({"created_within": 0}, "rules.created_within", "whole number of days"),
    ({"opened_within": 1.5}, "rules.opened_within", "whole number of days"),
    ({"clicked_within": True}, "rules.clicked_within", "whole number of days"),
    ({"sent_within": "7"}, "rules.sent_within", "whole number of days"),
    ({"event": ""}, "rules.event", "must be an event name"),
    ({"event": "x", "within": -1}, "rules.within", "whole number of days"),
    ({"event": "x", "min_count": 0}, "rules.min_count", "whole number from 1"),
    ({"event": "x", "since": 3}, "rules.since", "unexpected key 'since'"),
]


@pytest.mark.parametrize("rules,field,reason", BAD, ids=[f"{i}-{f}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_rules_name_their_path(rules, field, reason):
    with pytest.raises(InvalidSegment) as error:
        segments.parse(rules)
    assert error.value.field == field, str(error.value)
    assert reason in error.value.reason, str(error.value)
    assert str(error.value).startswith(f"{field}: ")
    assert isinstance(error.value, ValueError)


def test_depth_and_size_are_bounded():
    rule = {"status": "subscribed"}
    for _ in range(20):
        rule = {"not": rule}
    with pytest.raises(InvalidSegment, match="nest deeper"):
        segments.parse(rule)
    with pytest.raises(InvalidSegment, match="more than 500 rules"):
        segments.parse({"any": [{"status": "subscribed"}] * 600})


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "postgresql"])
def test_rules_compile_to_one_select_with_values_bound(dialect):
    rules = {
        "all": [
            {"attr": "plan", "op": "eq", "value": "pro'); DROP TABLE contacts; --"},
            {"attr": "name", "op": "gt", "value": "M"},
            {"list": "news"},
            {"opened_within": 30},
            {"not": {"event": "order_placed", "min_count": 2}},
        ]
    }
    query = segments.audience_query(rules, dialect)
    sql = str(query.compile(dialect=dialect))
    assert sql.count("SELECT") >= 1 and sql.startswith("SELECT contacts.id")
    assert "DROP TABLE" not in sql  # values are parameters, never spliced into the SQL
    if dialect.name == "postgresql":
        assert 'COLLATE "C"' in sql and "jsonb_typeof" in sql
    else:
        assert "json_type" in sql
