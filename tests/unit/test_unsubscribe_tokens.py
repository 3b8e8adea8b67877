"""Unit tests for smartmail.audience.unsubscribe: signed tokens and the List-Unsubscribe headers."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import os
import re
from email.message import EmailMessage

import pytest

from smartmail.config.settings import get_settings
from smartmail.content.unsubscribe_links import list_unsubscribe_headers, make_token, read_token, unsubscribe_url
from smartmail.errors import InvalidToken

SECRET = "unit-test-secret-0123456789"


@pytest.fixture(autouse=True)
def env(monkeypatch):
    """Only the required SMARTMAIL_* variables and a public URL; returns monkeypatch to set more."""
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAIL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", "News <news@example.com>")
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", SECRET)
    monkeypatch.setenv("SMARTMAIL_PUBLIC_URL", "https://mail.example.com/")
    get_settings.forget()
    yield monkeypatch
    get_settings.forget()


def sign(payload: str, purpose: str, secret: str = SECRET) -> str:
    """The documented scheme, written out independently: HMAC-SHA256 keyed by a per-purpose key."""
    key = hmac.new(secret.encode(), b"smartmail.token:" + purpose.encode(), hashlib.sha256).digest()
    mac = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


# --- Tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("contact_id", "campaign_id"), [(1, None), (42, 7), (2**63 - 1, 2**63 - 1), (9, None)])
def test_round_trip(contact_id, campaign_id):
    token = make_token(contact_id, campaign_id)
    assert read_token(token) == (contact_id, campaign_id)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", token), "URL-safe without escaping"
    assert len(token) <= 45 + 2 * 19
    assert make_token(contact_id, campaign_id) == token, "deterministic: the same link in every message"


def test_token_follows_the_documented_scheme():
    assert make_token(42, 7) == sign("42.7", "unsubscribe")
    assert make_token(42, None) == sign("42.", "unsubscribe")


def test_campaign_is_part_of_what_is_signed():
    assert make_token(42, 7) != make_token(42, 8) != make_token(42, None)
    signature = make_token(42, 7).rsplit(".", 1)[1]
    for altered in (f"42.8.{signature}", f"42..{signature}", f"43.7.{signature}", f"7.42.{signature}"):
        with pytest.raises(InvalidToken):
            read_token(altered)


def test_token_for_another_purpose_is_refused():
    with pytest.raises(InvalidToken, match="signature"):
        read_token(sign("42.7", "click"))
    with pytest.raises(InvalidToken):
        read_token(sign("42.7", ""))


def test_token_signed_with_another_secret_is_refused(env):
    token = make_token(42, 7)
    env.setenv("SMARTMAIL_SECRET_KEY", "another-secret-0123456789")
    get_settings.forget()
    with pytest.raises(InvalidToken, match="signature"):
        read_token(token)
    assert read_token(make_token(42, 7)) == (42, 7)


def test_forged_signature_is_refused():
    with pytest.raises(InvalidToken):
        read_token("42.7." + "A" * 43)
    with pytest.raises(InvalidToken):
        read_token(sign("42.7", "unsubscribe", secret="guessed-secret-0123456789"))


def test_every_changed_signature_character_is_refused():
    token = make_token(42, 7)
    payload, signature = token.rsplit(".", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for position in range(len(signature)):
        for replacement in (c for c in alphabet[:8] + alphabet[-4:] if c != signature[position]):
            forged = f"{payload}.{signature[:position]}{replacement}{signature[position + 1 :]}"
            with pytest.raises(InvalidToken):
                read_token(forged)
    # The last character holds 2 padding bits: another character decoding to the same bytes is
    # still a different token and refused (one spelling per signature).
    last = alphabet.index(signature[-1])
    for variant in alphabet[last & ~3 : (last & ~3) + 4]:
        if variant != signature[-1]:
            with pytest.raises(InvalidToken):
                read_token(f"{payload}.{signature[:-1]}{variant}")


def test_every_truncation_is_refused():
    token = make_token(123456, 789)
    for length in range(len(token)):
        with pytest.raises(InvalidToken):
            read_token(token[:length])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "x",
        lambda t: t + ".",
        lambda t: "0" + t,
        lambda t: " " + t,
        lambda t: t + "\n",
        lambda t: t.replace(".", "%2E", 1),
        lambda t: t.upper(),
        lambda t: "-" + t,
        lambda t: "x" * 5000,
    ],
)
def test_malformed_tokens_are_refused(mangle):
    with pytest.raises(InvalidToken):
        read_token(mangle(make_token(42, 7)))


@pytest.mark.parametrize("value", [None, b"42.7.x", 42, ["42"]])
def test_non_string_tokens_are_refused(value):
    with pytest.raises(InvalidToken):
        read_token(value)


def test_leading_zero_ids_are_refused_even_when_signed():
    # Only canonical spellings exist, so one contact has exactly one token per campaign.
    with pytest.raises(InvalidToken, match="malformed"):
        read_token(sign("042.7", "unsubscribe"))


@pytest.mark.parametrize(
    ("contact_id", "campaign_id"),
    [(0, None), (-1, None), (True, None), ("42", None), (2**63, None), (1.0, None), (42, 0), (42, "7"), (42, False)],
)
def test_make_token_refuses_bad_ids(contact_id, campaign_id):
    with pytest.raises(ValueError):
        make_token(contact_id, campaign_id)


# --- URL and headers ------------------------------------------------------------------------------------


def test_unsubscribe_url_uses_public_url_without_double_slash():
    assert unsubscribe_url("abc") == "https://mail.example.com/unsubscribe/abc"


def test_headers_exact_format_with_default_mailto():
    token = make_token(42, 7)
    headers = list_unsubscribe_headers(42, 7)
    assert headers == {
        "List-Unsubscribe": (
            f"<https://mail.example.com/unsubscribe/{token}>, "
            f"<mailto:unsubscribe@example.com?subject=unsubscribe%20{token}>"
        ),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    for value in headers.values():
        assert "\r" not in value and "\n" not in value


def test_default_mailto_follows_message_id_domain(env):
    env.setenv("SMARTMAIL_MESSAGE_ID_DOMAIN", "mx.example.org")
    get_settings.forget()
    assert "<mailto:unsubscribe@mx.example.org?subject=" in list_unsubscribe_headers(1, None)["List-Unsubscribe"]


@pytest.mark.parametrize(
    ("setting", "address"),
    [
        ("leave+news@example.net", "leave+news@example.net"),
        ("Unsubscribe Desk <desk@Example.NET>", "desk@example.net"),
    ],
)
def test_configured_mailto(env, setting, address):
    env.setenv("SMARTMAIL_UNSUBSCRIBE_MAILTO", setting)
    get_settings.forget()
    token = make_token(1, None)
    value = list_unsubscribe_headers(1, None)["List-Unsubscribe"]
    assert value.endswith(f", <mailto:{address}?subject=unsubscribe%20{token}>")


def test_bad_mailto_setting_is_an_error(env):
    env.setenv("SMARTMAIL_UNSUBSCRIBE_MAILTO", "not an address")
    get_settings.forget()
    with pytest.raises(ValueError, match="SMARTMAIL_UNSUBSCRIBE_MAILTO"):
        list_unsubscribe_headers(1, None)


@pytest.mark.parametrize(
    "public_url", ["https://mail.example.com/x\r\nBcc: victim@example.org", "https://mail.example.com/a\tb"]
)
def test_line_breaks_never_reach_a_header(env, public_url):
    # Settings validation passes these (urlsplit drops CR, LF and tab), so the headers must check.
    env.setenv("SMARTMAIL_PUBLIC_URL", public_url)
    get_settings.forget()
    assert get_settings().public_url == public_url
    with pytest.raises(ValueError, match="control character"):
        list_unsubscribe_headers(1, None)


def test_headers_survive_a_real_message_round_trip():
    headers = list_unsubscribe_headers(2**40, 99)
    message = EmailMessage(policy=email.policy.SMTP)
    message["Subject"] = "News"
    for name, value in headers.items():
        message[name] = value
    message.set_content("hello")
    raw = message.as_bytes()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")), "RFC 5322 line length"
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(parsed["List-Unsubscribe"]) == headers["List-Unsubscribe"]
    assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    url = re.match(r"<(https://[^>]+)>", str(parsed["List-Unsubscribe"])).group(1)
    assert read_token(url.rsplit("/", 1)[1]) == (2**40, 99)
