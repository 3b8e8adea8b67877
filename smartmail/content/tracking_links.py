"""Open and click tracking at render time: signed /t/o and /t/c links, links rewritten, the open pixel."""

from __future__ import annotations

import base64
import binascii
import functools
import html as html_lib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from smartmail.config import get_settings
from smartmail.content.signing import matches, signature, signer
from smartmail.errors import InvalidToken

# A click token is `<message id>.<link>.<url, base64url>.<signature>` and an open token
# `<message id>.<signature>`: the URL is signed into the link, so a click redirects with no
# database read (it works while the database is busy or down, and costs a signature check), and a
# forged, altered or truncated token names no URL at all. Purposes "click" and "open" keep them
# apart from each other and from unsubscribe tokens. Signatures are 128 bits (22 characters).
OPEN, CLICK = "open", "click"
HONEYPOT = 0  # the link number of the hidden link only machines follow; real links count from 1
_SIGNATURE_LENGTH = 22
_MESSAGE_ID = r"[0-9A-HJKMNP-TV-Z]{26}"
_SIGNED = rf"([A-Za-z0-9_-]{{{_SIGNATURE_LENGTH}}})"
_OPEN_TOKEN = re.compile(rf"({_MESSAGE_ID})\.{_SIGNED}")
_CLICK_TOKEN = re.compile(rf"({_MESSAGE_ID})\.(0|[1-9][0-9]{{0,3}})\.([A-Za-z0-9_-]*)\.{_SIGNED}")
MAX_TOKEN = 8192  # longer than any URL a mail client keeps
# A contact whose attributes set this to true is not tracked (their messages carry no pixel and
# no rewritten links).
TRACKING_OPT_OUT = "tracking_opt_out"
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")

# An <a> start tag, its href and a data-track="off" in it. Rendered HTML is scanned with
# expressions, not parsed: a parser costs more than the rest of a campaign message's render.
_A_TAG = re.compile(r"<a\s[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)("[^"]*"|'[^']*'|[^\s>"']+)""", re.IGNORECASE)
_TRACK_OFF = re.compile(r"""\sdata-track\s*=\s*(?:"off"|'off'|off)(?=[\s>/])""", re.IGNORECASE)
_PIXEL_STYLE = "display:block;border:0;width:1px;height:1px"
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
# A URL in the text part ends at white space or what cannot end one (RFC 3986 appendix C).
_TEXT_URL = re.compile(r"""https?://[^\s<>"]+""", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'"


@dataclass(frozen=True)
class Click:
    """A verified click token: the message, the link's number in it, where it leads (None: the honeypot)."""

    message_id: str
    link: int
    url: str | None


def _b64(url: str) -> str:
    return base64.urlsafe_b64encode(url.encode()).rstrip(b"=").decode()


@functools.lru_cache(maxsize=4096)
def _target(url: str, utm: tuple[tuple[str, str], ...]) -> str | None:
    """A link's destination as its token carries it (UTM added, base64url), or None when the link is
    not tracked. Cached: a campaign's messages mostly share their links."""
    return _b64(with_utm(url, dict(utm))) if _is_web_url(url) else None


def click_url(message_id: str, link: int, url: str) -> str:
    payload = f"{message_id}.{link}.{_b64(url)}"
    return f"{get_settings().public_url}/t/c/{payload}.{signature(payload, CLICK, length=_SIGNATURE_LENGTH)}"


def open_url(message_id: str) -> str:
    return f"{get_settings().public_url}/t/o/{message_id}.{signature(message_id, OPEN, length=_SIGNATURE_LENGTH)}"


def read_click(token: object) -> Click:
    """The click a token made by click_url names; InvalidToken for anything else."""
    match = _CLICK_TOKEN.fullmatch(token) if isinstance(token, str) and len(token) <= MAX_TOKEN else None
    if match is None:
        raise InvalidToken("the click token is malformed or truncated")
    message_id, link, encoded, signed = match.groups()
    if not matches(signed, f"{message_id}.{link}.{encoded}", CLICK, length=_SIGNATURE_LENGTH):
        raise InvalidToken("the click token's signature does not match")
    if int(link) == HONEYPOT:
        return Click(message_id, HONEYPOT, None)
    try:
        url = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidToken("the click token's URL is malformed") from None
    if not _is_web_url(url):  # only ever signed for http(s); checked again before any redirect
        raise InvalidToken("the click token's URL is not an http(s) URL")
    return Click(message_id, int(link), url)


def read_open(token: object) -> str:
    """The message id an open token made by open_url names; InvalidToken for anything else."""
    match = _OPEN_TOKEN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        raise InvalidToken("the open token is malformed or truncated")
    message_id, signed = match.groups()
    if not matches(signed, message_id, OPEN, length=_SIGNATURE_LENGTH):
        raise InvalidToken("the open token's signature does not match")
    return message_id


def _is_web_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc) and not any(c in url for c in "\r\n\t")


def with_utm(url: str, utm: Mapping[str, str] | None) -> str:
    """`url` with the campaign's UTM parameters added; a parameter the link sets itself is kept."""
    if not utm:
        return url
    parts = urlsplit(url)
    present = {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    added = [(key, value) for key, value in utm.items() if key in UTM_KEYS and key not in present]
    if not added:
        return url
    query = f"{parts.query}&{urlencode(added)}" if parts.query else urlencode(added)
    return urlunsplit(parts._replace(query=query))


class _Links:
    """A message's tracked links: one number per distinct URL, in order of first appearance."""

    def __init__(self, message_id: str, skip: Collection[str], utm: Mapping[str, str] | None) -> None:
        self.message_id, self.skip, self.utm = message_id, skip, tuple((utm or {}).items())
        self.prefix = f"{get_settings().public_url}/t/c/"
        self.sign = signer(CLICK, length=_SIGNATURE_LENGTH)
        self.numbers: dict[str, str | None] = {}  # URL as written -> its tracked URL (None: left as it is)
        self.count = 0

    def tracked(self, url: str) -> str | None:
        """The tracked URL for `url`, or None when it stays as it is (not http(s), or excluded)."""
        if url in self.numbers:
            return self.numbers[url]
        target = None if url in self.skip else _target(url, self.utm)
        if target is None:
            self.numbers[url] = None
            return None
        self.count += 1
        payload = f"{self.message_id}.{self.count}.{target}"
        tracked = self.numbers[url] = f"{self.prefix}{payload}.{self.sign(payload)}"
        return tracked


def track(
    html: str | None,
    text: str,
    *,
    message_id: str,
    opens: bool = True,
    clicks: bool = True,
    skip: Collection[str] = (),
    utm: Mapping[str, str] | None = None,
    honeypot: bool = False,
) -> tuple[str | None, str]:
    """The HTML and text parts with links rewritten (`clicks`) and the open pixel added (`opens`).
    Left alone: links with data-track="off" (the attribute is removed), non-http(s) ones
    (mailto:, javascript:, data:), and the URLs in `skip` (unsubscribe and List-Unsubscribe targets).
    A URL in both parts gets the same link number."""
    links = _Links(message_id, skip, utm)
    if html is not None:
        if clicks or "data-track" in html:
            html = _A_TAG.sub(lambda tag: _rewrite_tag(tag.group(0), links if clicks else None), html)
        extra = ""
        if clicks and honeypot:
            hidden = click_url(message_id, HONEYPOT, "")
            extra += f'<a href="{hidden}" style="display:none" aria-hidden="true" tabindex="-1"></a>'
        if opens:
            pixel = open_url(message_id)
            extra += f'<img src="{pixel}" width="1" height="1" alt="" style="{_PIXEL_STYLE}">'
        if extra:
            ends = list(_BODY_END.finditer(html))
            html = f"{html[: ends[-1].start()]}{extra}{html[ends[-1].start() :]}" if ends else html + extra
    if clicks:
        text = _TEXT_URL.sub(lambda found: _rewrite_text_url(found.group(0), links), text)
    return html, text


def _rewrite_tag(tag: str, links: _Links | None) -> str:
    if _TRACK_OFF.search(tag):
        return _TRACK_OFF.sub("", tag, count=1)
    if links is None:
        return tag
    href = _HREF.search(tag)
    if href is None:
        return tag
    quoted = href.group(2)
    url = html_lib.unescape(quoted[1:-1] if quoted[0] in "\"'" else quoted).strip()
    tracked = links.tracked(url)
    if tracked is None:
        return tag
    return f'{tag[: href.start(2)]}"{tracked}"{tag[href.end(2) :]}'  # the token's characters need no escaping


def _rewrite_text_url(found: str, links: _Links) -> str:
    url = found.rstrip(_TRAILING)
    tracked = links.tracked(url)
    return found if tracked is None else tracked + found[len(url) :]
