"""Unsubscribe links: signed tokens, the unsubscribe URL and the List-Unsubscribe headers (RFC 2369, RFC 8058)."""

from __future__ import annotations

import functools
import html as html_lib
import re
from urllib.parse import quote

from smartmail.addresses import AddressError, parse_mailbox
from smartmail.config import get_settings
from smartmail.content.signing import matches, signature
from smartmail.errors import InvalidToken

# Tokens are `<contact id>.<campaign id or empty>.<signature>`, e.g. `42.7.3q2-…` (~50 characters,
# all URL-safe). The ids are signed, not encrypted: they are opaque database keys, not personal data.
# The signature is HMAC-SHA256 (RFC 2104) over the payload, keyed with a key derived from
# SMARTMAIL_SECRET_KEY and the purpose "unsubscribe", so a token signed for another purpose
# (click tracking, say) never verifies here, and vice versa.
#
# Tokens never expire, on purpose: an unsubscribe link in a message opened years later must still
# work (an opt-out that fails is a complaint, and a legal problem under CAN-SPAM and GDPR).
# Rotating SMARTMAIL_SECRET_KEY invalidates every link already sent.
PURPOSE = "unsubscribe"
_ID = r"[1-9][0-9]{0,18}"  # canonical decimal (no sign, no leading zero); fits a 64-bit id
_TOKEN = re.compile(rf"({_ID})\.({_ID})?\.([A-Za-z0-9_-]{{43}})")  # 43 = unpadded base64url of 32 bytes
_MAX_ID = 2**63 - 1
# What must never reach a header value: CR/LF would start a new header (RFC 5322 section 2.2);
# other controls, spaces, `<`, `>` and `,` would break the `<uri>, <uri>` list of RFC 2369.
_BAD_IN_URI = re.compile(r"[\x00-\x20\x7f<>,]")


def _check_id(value: object, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_ID:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def make_token(contact_id: int, campaign_id: int | None) -> str:
    """A URL-safe token naming the contact (and the campaign the message came from, if any)."""
    _check_id(contact_id, "contact_id")
    _check_id(campaign_id, "campaign_id", optional=True)
    payload = f"{contact_id}.{'' if campaign_id is None else campaign_id}"
    return f"{payload}.{signature(payload, PURPOSE)}"


def read_token(token: object) -> tuple[int, int | None]:
    """(contact_id, campaign_id) from a token made by make_token; InvalidToken for anything else."""
    if not isinstance(token, str) or len(token) > 100:
        raise InvalidToken("the unsubscribe token is malformed")
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise InvalidToken("the unsubscribe token is malformed or truncated")
    contact, campaign, signed = match.groups()
    if not matches(signed, f"{contact}.{campaign or ''}", PURPOSE):
        raise InvalidToken("the unsubscribe token's signature does not match")
    return int(contact), (int(campaign) if campaign else None)


def unsubscribe_url(token: str) -> str:
    """The link in messages and the RFC 8058 one-click POST target: `{public_url}/unsubscribe/{token}`."""
    return f"{get_settings().public_url}/unsubscribe/{token}"


def mailto_address() -> str:
    """The address of the List-Unsubscribe mailto: SMARTMAIL_UNSUBSCRIBE_MAILTO's address, else
    `unsubscribe@<sender domain>`. ValueError when the setting is not an address."""
    settings = get_settings()
    return _mailto_address(settings.unsubscribe_mailto, settings.sender_domain)


def _mailto_address(unsubscribe_mailto: str | None, sender_domain: str) -> str:
    if not unsubscribe_mailto:
        return f"unsubscribe@{sender_domain}"
    try:  # accepts `addr@domain` or `Name <addr@domain>`; only the address goes in the URI
        return parse_mailbox(unsubscribe_mailto, field="SMARTMAIL_UNSUBSCRIBE_MAILTO").address
    except AddressError as exc:
        raise ValueError(str(exc)) from None


@functools.lru_cache(maxsize=8)
def _uri_prefixes(public_url: str, unsubscribe_mailto: str | None, sender_domain: str) -> tuple[str, str]:
    """What precedes the token in the https and mailto URIs, checked once per settings: a campaign
    makes these headers for every message."""
    # RFC 6068: the address and subject are percent-encoded; `@` and `+` may stay as they are.
    # The subject is `unsubscribe <token>`; tokens are URL-safe, so only the space is encoded.
    prefixes = (
        f"{public_url}/unsubscribe/",
        f"mailto:{quote(_mailto_address(unsubscribe_mailto, sender_domain), safe='@+')}?subject=unsubscribe%20",
    )
    for prefix in prefixes:
        # SMARTMAIL_PUBLIC_URL is validated as a URL, but urlsplit silently drops CR, LF and tab,
        # so check what actually goes in the header. A raise, not an assert: asserts vanish under -O.
        if _BAD_IN_URI.search(prefix):
            raise ValueError(
                f"unsubscribe URI {prefix!r} contains a control character, space, '<', '>' or ','"
                " (check SMARTMAIL_PUBLIC_URL and SMARTMAIL_UNSUBSCRIBE_MAILTO)"
            )
    return prefixes


def list_unsubscribe_headers(contact_id: int, campaign_id: int | None, *, token: str | None = None) -> dict[str, str]:
    """`List-Unsubscribe` (an https link first, for RFC 8058 one-click, then a mailto: RFC 2369
    section 3.2) and `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058 section 3.1).
    `token`: the caller's make_token(contact_id, campaign_id), when it has one already."""
    token = token or make_token(contact_id, campaign_id)
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{token!r} is not an unsubscribe token")
    settings = get_settings()
    url, mailto = _uri_prefixes(settings.public_url, settings.unsubscribe_mailto, settings.sender_domain)
    return {
        "List-Unsubscribe": f"<{url}{token}>, <{mailto}{token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def with_unsubscribe_link(html: str | None, text: str, url: str) -> tuple[str | None, str]:
    """The parts with a visible unsubscribe link added where the template did not place `url`:
    every marketing message shows a way out."""
    if html is not None and url not in html:
        footer = f'<p style="font-size:12px;color:#666"><a href="{html_lib.escape(url)}">Unsubscribe</a></p>'
        html = html.replace("</body>", footer + "</body>") if "</body>" in html else html + footer
    if url not in text:
        text = f"{text.rstrip()}\n\nUnsubscribe: {url}\n"
    return html, text
