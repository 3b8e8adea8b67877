"""Unit tests for smartmail.addresses: mailbox parsing, header checks, normalization."""

from __future__ import annotations

import pytest

from smartmail.addresses import (
    RESERVED_HEADERS,
    AddressError,
    Mailbox,
    check_headers,
    normalize_address,
    parse_mailbox,
    reject_line_breaks,
)

# --- parse_mailbox: valid input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address", "display_name"),
    [
        ("bob@example.com", "bob@example.com", ""),
        ("  bob@example.com  ", "bob@example.com", ""),
        ("<bob@example.com>", "bob@example.com", ""),
        ("Bob <bob@example.com>", "bob@example.com", "Bob"),
        ('"Smith, Bob" <bob@example.com>', "bob@example.com", "Smith, Bob"),
        ("Ålice Ünicode <alice@example.com>", "alice@example.com", "Ålice Ünicode"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk", ""),
        ("o'brien@example.ie", "o'brien@example.ie", ""),
        # The domain is lower-cased; the local part is kept (it may be case-sensitive, RFC 5321 section 2.4).
        ("Bob.Smith@EXAMPLE.Com", "Bob.Smith@example.com", ""),
    ],
)
def test_valid_mailboxes(value, address, display_name):
    mailbox = parse_mailbox(value)
    assert mailbox == Mailbox(address=address, display_name=display_name)


def test_mailbox_domain():
    assert parse_mailbox("Bob <bob@Mail.Example.com>").domain == "mail.example.com"


def test_mailbox_str_without_display_name_is_the_bare_address():
    assert str(parse_mailbox("bob@example.com")) == "bob@example.com"


def test_mailbox_str_quotes_a_display_name_that_needs_it():
    assert str(parse_mailbox('"Smith, Bob" <bob@example.com>')) == '"Smith, Bob" <bob@example.com>'
    assert str(parse_mailbox("Bob <bob@example.com>")) == "Bob <bob@example.com>"


def test_mailbox_str_round_trips_through_parse_mailbox():
    for value in ('"Smith, Bob" <bob@example.com>', '"O\'Brien (work)" <ob@example.ie>', "Ålice <a@example.com>"):
        mailbox = parse_mailbox(value)
        assert parse_mailbox(str(mailbox)) == mailbox


def test_a_display_name_that_looks_like_an_address_is_only_a_display_name():
    mailbox = parse_mailbox('"ceo@bank.example" <attacker@example.com>')
    assert mailbox.address == "attacker@example.com"
    assert mailbox.domain == "example.com"


# --- parse_mailbox: invalid input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "not an address",
        "bob",
        "bob@",
        "@example.com",
        "bob@example",  # no dot in the domain
        "bob@localhost",
        "bob..smith@example.com",  # consecutive dots
        ".bob@example.com",
        "bob@-example.com",
        "bob@[127.0.0.1]",  # domain literals are not accepted
        "üser@example.com",  # non-ASCII local part would need SMTPUTF8, which is off
        "Bob bob@example.com",  # display name without angle brackets
        "undisclosed-recipients:;",
        "<>",
    ],
)
def test_invalid_mailboxes_are_rejected(value):
    with pytest.raises(AddressError) as info:
        parse_mailbox(value, field="to")
    assert info.value.field == "to"
    assert str(info.value).startswith("to: ")


@pytest.mark.parametrize("value", ["", "   ", None, 42, b"bob@example.com"])
def test_missing_or_non_string_address_is_required(value):
    with pytest.raises(AddressError) as info:
        parse_mailbox(value, field="sender")  # type: ignore[arg-type]
    assert info.value.field == "sender"
    assert info.value.reason == "an email address is required"


def test_default_field_name_is_address():
    with pytest.raises(AddressError) as info:
        parse_mailbox("nope")
    assert info.value.field == "address"


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.com, bob@example.com",
        "Alice <alice@example.com>, Bob <bob@example.com>",
        "alice@example.com; bob@example.com",
        "alice@example.com bob@example.com",
        "Alice <alice@example.com> <bob@example.com>",
        "alice@example.com)<bob@example.com>",  # CVE-2023-27043 style parser confusion
        "team: alice@example.com, bob@example.com;",
        ",bob@example.com",
    ],
)
def test_two_addresses_in_one_string_are_rejected(value):
    with pytest.raises(AddressError) as info:
        parse_mailbox(value, field="to")
    assert info.value.field == "to"


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\0"])
@pytest.mark.parametrize(
    "template",
    ["bob@example.com{}", "Bob{} <bob@example.com>", "bob@example.com{}Bcc: eve@example.com", "{}bob@example.com"],
)
def test_line_breaks_and_nul_are_rejected_with_the_field_named(bad, template):
    with pytest.raises(AddressError) as info:
        parse_mailbox(template.format(bad), field="reply_to")
    assert info.value.field == "reply_to"
    assert "CR, LF or NUL" in info.value.reason
    assert str(info.value) == "reply_to: must not contain CR, LF or NUL characters"


def test_address_error_is_a_value_error():
    assert issubclass(AddressError, ValueError)
    err = AddressError("why", field="what")
    assert (err.field, err.reason, str(err)) == ("what", "why", "what: why")


def test_internationalized_domain_is_converted_to_its_ascii_form():
    mailbox = parse_mailbox("user@Bücher.de")
    assert mailbox.address == "user@xn--bcher-kva.de"
    assert mailbox.address.isascii()


@pytest.mark.parametrize("value", ["bob@exa mple.com", "bob@example.com evil.com", "Bob <bob@example .com>"])
def test_whitespace_inside_the_address_is_rejected_not_removed(value):
    with pytest.raises(AddressError):
        parse_mailbox(value)


# --- reject_line_breaks -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["plain", "", "tab\tis fine", "unicode é ✓"])
def test_reject_line_breaks_accepts_single_line_values(value):
    reject_line_breaks(value, field="subject")  # no exception


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nb", "a\0b", "trailing\n"])
def test_reject_line_breaks_names_the_field(value):
    with pytest.raises(AddressError) as info:
        reject_line_breaks(value, field="subject")
    assert info.value.field == "subject"


# --- normalize_address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bob@Example.COM", "bob@example.com"),
        ("  bob@example.com\t", "bob@example.com"),
        ("bob@example.com", "bob@example.com"),
    ],
)
def test_normalize_address(value, expected):
    assert normalize_address(value) == expected


def test_normalize_address_is_idempotent():
    once = normalize_address(" Bob@Example.com ")
    assert normalize_address(once) == once


# --- check_headers ------------------------------------------------------------------------------


def test_check_headers_accepts_and_returns_custom_headers():
    headers = {"X-Campaign": "spring", "List-Id": "<news.example.com>", "X-Empty": "", "X~Odd!Name#": "ok"}
    assert check_headers(headers) == headers


@pytest.mark.parametrize("headers", [None, {}])
def test_check_headers_of_nothing_is_empty(headers):
    assert check_headers(headers) == {}


def test_check_headers_returns_a_new_dict():
    headers = {"X-A": "1"}
    checked = check_headers(headers)
    assert checked == headers and checked is not headers


@pytest.mark.parametrize(
    "name",
    ["X Space", "X:Colon", "", "X-Ünicode", "X-Tab\t", "X-CR\rY", "X-LF\nY", "X-Del\x7f", "X-NUL\0", 42, None],
)
def test_invalid_header_names_are_rejected(name):
    with pytest.raises(AddressError) as info:
        check_headers({name: "v"}, field="headers")
    assert info.value.field == "headers"
    assert "not a valid header name" in info.value.reason


def test_header_name_with_a_trailing_newline_is_rejected():
    with pytest.raises(AddressError):
        check_headers({"X-Foo\n": "v"})


@pytest.mark.parametrize("name", sorted(RESERVED_HEADERS))
def test_reserved_headers_are_refused(name):
    with pytest.raises(AddressError) as info:
        check_headers({name: "x"})
    assert info.value.field == f"headers.{name}"
    assert "cannot be overridden" in info.value.reason


@pytest.mark.parametrize("name", ["FROM", "subject", "Message-Id", "bCc", "return-path", "CONTENT-TYPE"])
def test_reserved_headers_are_refused_case_insensitively(name):
    with pytest.raises(AddressError) as info:
        check_headers({name: "x"}, field="extra")
    assert info.value.field == f"extra.{name}"


def test_reserved_set_covers_the_headers_smartmail_writes():
    assert {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "message-id",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "sender",
        "return-path",
    } == set(RESERVED_HEADERS)


@pytest.mark.parametrize("value", ["a\r\nBcc: eve@example.com", "a\nb", "a\rb", "a\0b"])
def test_header_values_with_line_breaks_are_rejected_naming_the_header(value):
    with pytest.raises(AddressError) as info:
        check_headers({"X-Ok": "fine", "X-Bad": value})
    assert info.value.field == "headers.X-Bad"


@pytest.mark.parametrize("value", [1, None, b"bytes", ["list"]])
def test_non_string_header_values_are_rejected(value):
    with pytest.raises(AddressError) as info:
        check_headers({"X-Num": value})  # type: ignore[dict-item]
    assert info.value.field == "headers.X-Num"
    assert info.value.reason == "header values must be strings"
