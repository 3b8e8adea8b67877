"""Unit tests for smartmail.content.mime: what build_mime writes parses back, with the stdlib, to its inputs."""

from __future__ import annotations

import binascii
import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.headerregistry import Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmail.content.mime import _end_with_soft_break, build_mime

DATE = datetime(2024, 5, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=2)))


def build(**overrides) -> bytes:
    kwargs = dict(
        sender="Ann <ann@example.org>",
        recipient="bob@example.com",
        subject="Hello",
        text="Hi Bob",
        html="<p>Hi Bob</p>",
        message_id="<abc123@mail.example.org>",
        date=DATE,
    )
    kwargs.update(overrides)
    return build_mime(**kwargs)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects
    return msg


def crlf(text: str) -> str:
    """The canonical form of text (RFC 2046 section 4.1.1): every line break is CRLF."""
    return re.sub(r"\r\n|\r|\n", "\r\n", text)


def assert_wire_format(data: bytes) -> None:
    """CRLF after every line, none over 998 octets, nothing but ASCII (no 8BITMIME needed)."""
    assert data.isascii()
    assert data.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None
    assert max(map(len, data.split(b"\r\n"))) <= 998
    header = data.partition(b"\r\n\r\n")[0] + b"\r\n"
    # Once, at top level (RFC 2045 section 4); the parts are checked for it separately.
    assert re.findall(rb"(?im)^MIME-Version:.*\r$", header) == [b"MIME-Version: 1.0\r"]


def mailbox(msg: email.message.EmailMessage, field: str) -> tuple[str, str]:
    """(display name, address) of a one-mailbox field.

    A name too long for one encoded-word is decoded with `email.header`: the stdlib policy
    parser keeps the space between adjacent encoded-words in a display name (CPython
    gh-128110), where RFC 2047 section 6.2 says to drop it, as mail clients do.
    """
    (address,) = msg[field].addresses
    raw = dict(msg.raw_items())[field]
    phrase = raw.rpartition("<")[0].strip()
    if phrase.count("=?") > 1:
        return str(make_header(decode_header(phrase))), address.addr_spec
    return address.display_name, address.addr_spec


def transfer_lines(part: email.message.EmailMessage) -> list[bytes]:
    return part.get_payload(decode=False).encode("ascii").split(b"\r\n")


BODIES = {
    "empty": "",
    "ascii": "Hello Bob,\n\nyour order shipped.\n",
    "no final newline": "one line only",
    "accented": "Grüße aus Köln, à bientôt, ¿qué tal?\nZażółć gęślą jaźń\n",
    "emoji": "Party 🎉🎉 time 👩‍👩‍👧\n",
    "cyrillic": "Привет, мир! " * 30,
    "cjk": "你好，世界。\n" * 20,
    "long ascii line": "x" * 3000 + "\nshort\n" + "y " * 800,
    "long accented line": "é" * 2500,
    "dots": ".\n.hidden\n..\nend\n.",
    "from lines": "From here on\nFrom: me\n>From quoted\n",
    "trailing whitespace": "spaces   \ntab\t\nboth \t \n   ",
    "crlf": "a\r\nb\r\n\r\nc\r\n",
    "lone cr": "a\rb\r\rc",
    "mixed breaks": "a\r\nb\nc\rd",
    "equals": "a=b ==3D =\n=?utf-8?q?x?=\n",
    "qp line edge": "a" * 76,
    "qp line edge escaped": "a" * 74 + "é",
    "nul and controls": "a\0b\x01c\x7fd\x0ce\x1b",
    "line at 998": "z" * 998 + "\n",
    "line at 999": "z" * 999 + "\n",
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_text_only_is_single_text_plain_part(body):
    data = build(text=body, html=None)
    assert_wire_format(data)
    msg = parse(data)
    assert not msg.is_multipart()
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content() == crlf(body)


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_alternative_parts_round_trip(body):
    html = f"<html><body><p>{body}</p></body></html>"
    data = build(text=body, html=html)
    assert_wire_format(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    # RFC 2046 section 5.1.4: least preferred first, so plain text before HTML.
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content() == crlf(body)
    assert parts[1].get_content() == crlf(html)
    for part in parts:
        assert part.get_content_charset() == "utf-8"
        assert "MIME-Version" not in part


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_encoded_lines_stay_within_their_limits(body):
    for html in (None, body):
        msg = parse(build(text=body, html=html))
        for part in [msg] if html is None else list(msg.iter_parts()):
            cte = part["Content-Transfer-Encoding"]
            lines = transfer_lines(part)
            if cte in ("quoted-printable", "base64"):
                # RFC 2045 sections 6.7 and 6.8.
                assert max(map(len, lines)) <= 76, cte
            else:
                assert cte == "7bit"
                assert body.isascii() and "\0" not in body


@pytest.mark.parametrize("length", range(70, 82))
def test_final_soft_break_never_splits_an_escape(length):
    # A single part whose text has no final line break ends with a quoted-printable soft
    # break; on a full last line that break moves left of any "=XX" escape.
    for at in range(length):
        body = "a" * at + "=" + "b" * (length - at - 1)
        msg = parse(build(text=body, html=None))
        assert msg.get_content() == body
        assert max(map(len, transfer_lines(msg))) <= 76


@pytest.mark.parametrize("at", range(70, 74))
def test_final_soft_break_placement(at):
    # b2a_qp leaves no escape that close to column 76, so feed the helper such lines directly.
    line = b"a" * at + b"=C3" + b"b" * (76 - at - 3)
    for body in (line, b"x=\n" + line):
        out = _end_with_soft_break(body)
        assert out.endswith(b"=\n")
        assert binascii.a2b_qp(out) == binascii.a2b_qp(body)
        assert max(map(len, out.split(b"\n"))) <= 76


def test_ascii_bodies_stay_readable():
    msg = parse(build(text="Hello Bob,\nbye\n", html="<p>Hello</p>"))
    assert [p["Content-Transfer-Encoding"] for p in msg.iter_parts()] == ["7bit", "7bit"]
    # Mostly-Latin text goes quoted-printable; mostly non-Latin text base64, the smaller there.
    german = "Grüße aus Köln, Bob. Deine Bestellung ist unterwegs.\n"
    assert parse(build(text=german, html=None))["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, Bob." in build(text=german, html=None)
    assert parse(build(text="Привет, мир!", html=None))["Content-Transfer-Encoding"] == "base64"


def test_headers_decode_to_inputs():
    data = build(
        sender='"Doe, J" <j@example.com>',
        recipient="Zoë Ångström <zoe@example.org>",
        reply_to='"Müller, Jörg \\"JM\\"" <jm@example.net>',
        subject="Grüße 🎉 — your order",
        headers={
            "X-Campaign": "spring-sale",
            "X-Note": "naïve café",
            "List-Unsubscribe": "<https://example.com/u/abc>, <mailto:u@example.com>",
        },
    )
    assert_wire_format(data)
    msg = parse(data)
    assert mailbox(msg, "From") == ("Doe, J", "j@example.com")
    assert mailbox(msg, "To") == ("Zoë Ångström", "zoe@example.org")
    assert mailbox(msg, "Reply-To") == ('Müller, Jörg "JM"', "jm@example.net")
    assert msg["Subject"] == "Grüße 🎉 — your order"
    assert msg["Message-ID"] == "<abc123@mail.example.org>"
    assert msg["Date"].datetime == DATE
    assert msg["X-Campaign"] == "spring-sale"
    assert msg["X-Note"] == "naïve café"
    assert msg["List-Unsubscribe"] == "<https://example.com/u/abc>, <mailto:u@example.com>"
    assert msg["MIME-Version"] == "1.0"


def test_bare_address_and_no_reply_to():
    msg = parse(build(sender="a@b.com", reply_to=None))
    assert msg["From"].addresses[0].addr_spec == "a@b.com"
    assert msg["From"].addresses[0].display_name == ""
    assert "Reply-To" not in msg


def test_date_defaults_to_now_utc():
    msg = parse(build(date=None))
    sent = msg["Date"].datetime
    assert sent.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - sent) < timedelta(seconds=5)


def test_long_subjects_are_folded():
    for subject in (
        "word " * 60 + "end",
        "Grüße aus Köln, " * 20 + "Ende",
        "你好世界" * 40,
        "x" * 500,
        "y" * 1200,
        "=?utf-8?q?not_an_encoded_word?=",
    ):
        data = build(subject=subject, headers={"X-Long": subject})
        assert_wire_format(data)
        header = data.partition(b"\r\n\r\n")[0]
        if " " in subject or not subject.isascii():
            assert max(map(len, header.split(b"\r\n"))) <= 78, subject
        msg = parse(data)
        assert msg["Subject"] == subject
        assert msg["X-Long"] == subject


def test_long_display_names_are_folded():
    for name in ("Ann " * 30 + "Lee", "Jörg Müller-Lüdenscheidt " * 6 + "Jr", "😀" * 40):
        sender = str(Address(display_name=name, username="x", domain="example.org"))
        data = build(sender=sender)
        assert max(map(len, data.partition(b"\r\n\r\n")[0].split(b"\r\n"))) <= 78
        assert mailbox(parse(data), "From") == (name, "x@example.org")


def test_boundary_is_random_and_absent_from_bodies():
    boundaries = set()
    for _ in range(20):
        msg = parse(build(text="--=_ look-alike\n", html="<p>--=_</p>"))
        boundary = msg.get_boundary()
        assert len(boundary) >= 32
        for part in msg.iter_parts():
            assert boundary not in part.get_payload()
        boundaries.add(boundary)
    assert len(boundaries) == 20


def test_non_ascii_address_is_refused():
    with pytest.raises(ValueError):
        build(recipient="Zoë <zoë@example.org>")


# --- properties ---------------------------------------------------------------------------------

header_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"), max_size=200).map(
    str.strip
)
display_name = (
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=80)
    .map(lambda s: " ".join(s.split()))
    .filter(bool)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=3000), html=st.none() | st.text(max_size=3000))
def test_bodies_round_trip(text, html):
    data = build(text=text, html=html)
    assert_wire_format(data)
    msg = parse(data)
    if html is None:
        assert msg.get_content() == crlf(text)
    else:
        plain, rich = msg.iter_parts()
        assert plain.get_content() == crlf(text)
        assert rich.get_content() == crlf(html)


@settings(max_examples=300, deadline=None)
@given(subject=header_text, value=header_text, name=display_name)
def test_headers_round_trip(subject, value, name):
    sender = str(Address(display_name=name, username="someone", domain="example.org"))
    data = build(subject=subject, sender=sender, headers={"X-Value": value})
    assert_wire_format(data)
    msg = parse(data)
    assert msg["Subject"] == subject
    assert msg["X-Value"] == value
    assert mailbox(msg, "From") == (name, "someone@example.org")
