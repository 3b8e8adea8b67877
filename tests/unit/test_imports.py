"""Import reading without a database: type conversion, delimiter and encoding detection, row errors, safe cells."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from smartmail.audience import imports
from smartmail.audience.contacts import email_problem
from smartmail.audience.exports import safe_cell
from smartmail.audience.imports import ImportOptions, Record, RowError, convert, readers


@pytest.mark.parametrize(
    "value,kind,expected",
    [
        ("42", "number", 42),
        ("4.5", "number", 4.5),
        (" -3 ", "integer", -3),
        ("3.0", "integer", 3),
        ("Yes", "boolean", True),
        ("0", "boolean", False),
        (True, "boolean", True),
        ("2024-05-01", "date", "2024-05-01"),
        ("2024-05-01T10:00:00", "date", "2024-05-01"),
        ("2024-05-01T10:00:00+02:00", "datetime", "2024-05-01T08:00:00"),
        ('{"a": [1]}', "json", {"a": [1]}),
        (7, "string", "7"),
        ("x", "string", "x"),
        (5, "number", 5),
    ],
)
def test_convert(value, kind, expected):
    assert convert(value, kind) == expected and type(convert(value, kind)) is type(expected)


@pytest.mark.parametrize(
    "value,kind",
    [
        ("x", "number"),
        ("nan", "number"),
        ("inf", "number"),
        ("3.5", "integer"),
        ("maybe", "boolean"),
        ("2024-02-30", "date"),
        ("noon", "datetime"),
        ("{", "json"),
        (True, "number"),
    ],
)
def test_convert_refuses(value, kind):
    with pytest.raises(ValueError):
        convert(value, kind)


@pytest.mark.parametrize(
    "head,expected",
    [
        ("a,b,c\n1,2,3\n", ","),
        ("a;b;c\n1;2,5;3\n", ";"),
        ("a\tb\n1\t2\n", "\t"),
        ("a|b\n1|2\n", "|"),
        ('email;note\nx@y.org;"a, b, c, d"\n', ";"),
        ("email\nx@y.org\n", ","),
    ],
)
def test_sniff_delimiter(head, expected):
    assert readers._sniff_delimiter(head) == expected


def test_detect_encoding():
    assert readers._detect_encoding(b"\xef\xbb\xbfemail\n") == "utf-8-sig"
    good = "email,name\n" + "".join(f"u{i}@example.org,Zoé\n" for i in range(100))
    assert readers._detect_encoding(good.encode()) == "utf-8"
    # A few broken rows in a UTF-8 file keep it UTF-8 (those rows are reported)...
    assert readers._detect_encoding(good.encode() + b"x@example.org,\xff\n") == "utf-8"
    # ...while a file in a legacy encoding is recognised as such.
    legacy = ("email,nom\n" + "".join(f"u{i}@example.org,Chloé Besançon à Orléans\n" for i in range(100))).encode(
        "cp1252"
    )
    assert readers._detect_encoding(legacy).lower().replace("_", "-") in (
        "cp1252",
        "windows-1252",
        "latin-1",
        "iso-8859-1",
        "iso-8859-15",
    )


def test_read_csv_reports_each_bad_row(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(
        b"Email,Age,Status,TZ\n"
        b"ok@example.org,3,,\n"
        b"bad,4,,\n"
        b",5,,\n"
        b"x@example.org,\xff,,\n"
        b"y@example.org,6\n"
        b"z@example.org,seven,,\n"
        b"s@example.org,8,paused,\n"
        b"t@example.org,9,,Mars/Base\n"
        b"\n"
        b"last@example.org,10,unsubscribed,Europe/Oslo\n"
    )
    options = imports.check_options(path, ImportOptions(types={"Age": "integer"}))
    items = {row: item for row, item, _ in imports.read_csv(path, options)}
    assert isinstance(items[2], Record) and items[2].attributes == {"Age": 3}
    reasons = {row: (item.field, item.reason) for row, item in items.items() if isinstance(item, RowError)}
    assert reasons[3][0] == "email" and "not a valid email address" in reasons[3][1]
    assert reasons[4] == ("email", "missing email address")
    assert reasons[5][0] == "Age" and "undecodable" in reasons[5][1]
    assert reasons[6] == ("(row)", "expected 4 columns, found 2")
    assert reasons[7][0] == "Age" and "not a valid integer" in reasons[7][1]
    assert reasons[8][0] == "status" and reasons[9][0] == "timezone"
    assert 10 not in items  # a blank line is no row
    last = items[11]
    assert (last.email, last.status, last.timezone, last.attributes) == (
        "last@example.org",
        "unsubscribed",
        "Europe/Oslo",
        {"Age": 10},
    )


def test_safe_cell():
    for dangerous in ("=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1"):
        assert safe_cell(dangerous) == "'" + dangerous
    assert safe_cell("plain") == "plain" and safe_cell(-1) == -1 and safe_cell("a=b") == "a=b"


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9._%+!#$&'*/=?^`{|}~-]{1,20}@[A-Za-z0-9.-]{1,20}\.[A-Za-z]{2,6}", fullmatch=True))
def test_email_fast_path_agrees_with_email_validator(value):
    """The memoized fast path must accept exactly what email-validator accepts, normalized the same way."""
    email, reason = email_problem(value)
    try:
        valid = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        assert email is None and reason
        return
    assert email == (valid.ascii_email or valid.normalized).lower()
