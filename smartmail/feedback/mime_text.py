"""Reading inbound mail defensively: bounded part walks, header and body text that never raise on bad input."""

from __future__ import annotations

import email.header
import re
from collections.abc import Collection, Iterator
from email.message import Message
from email.parser import HeaderParser

MAX_PARTS = 200  # deeper or wider MIME trees are not reports; the walk stops here
TEXT_MAX = 64 * 1024  # characters of a body searched for words and addresses
# `Message-ID: <ULID@domain>`: SmartMail's own Message-IDs (producer.sending) are the message id, a
# ULID (26 characters of Crockford base32, the first at most 7), at the sender domain.
_OUR_MESSAGE_ID = re.compile(r"<\s*([0-7][0-9a-hjkmnp-tv-z]{25})@[^>\s]+>", re.IGNORECASE)
_QUOTED_MESSAGE_ID = re.compile(r"^[ \t>]*Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def parts(message: Message) -> Iterator[Message]:
    """The message and its parts, depth first, at most MAX_PARTS of them."""
    for count, part in enumerate(message.walk()):
        if count >= MAX_PARTS:
            return
        yield part


def first_part(message: Message, types: Collection[str]) -> Message | None:
    """The first part of one of these content types, wherever it is: a multipart/report (RFC 6522)
    is often wrapped in another multipart by forwarding relays, so every part is looked at."""
    for part in parts(message):
        if part.get_content_type() in types:
            return part
    return None


def header(message: Message, name: str) -> str:
    """A header's value as text ("" when missing): RFC 2047 encoded-words decoded, raw 8-bit bytes
    (RFC 6532 UTF-8, which compat32 hands back as a Header object) read as UTF-8, never an exception."""
    value = message.get(name)
    if value is None:
        return ""
    if isinstance(value, str) and "=?" not in value:
        return value
    try:
        chunks = email.header.decode_header(value)
    except Exception:  # a malformed encoded-word: keep what is readable
        return str(value)
    return "".join(_decoded(data, charset) for data, charset in chunks)


def _decoded(data: bytes | str, charset: str | None) -> str:
    if isinstance(data, str):
        return data
    if charset in (None, "unknown-8bit"):
        charset = "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError):  # an unknown or bogus charset name
        return data.decode("utf-8", "replace")


def body_text(part: Message) -> str:
    """A non-multipart part's body decoded (transfer encoding, then its charset, falling back on
    UTF-8 with replacement characters), cut at TEXT_MAX characters; "" for anything else."""
    if part.is_multipart():
        return ""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(payload, bytes):
        return ""
    payload = payload[: TEXT_MAX * 4]
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except (LookupError, ValueError):  # an unknown or bogus charset name
        text = payload.decode("utf-8", "replace")
    return text[:TEXT_MAX]


def texts(message: Message) -> str:
    """The text/plain parts (text/html only when there is none) joined, at most TEXT_MAX characters."""
    plain: list[str] = []
    html: list[str] = []
    for part in parts(message):
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(body_text(part))
        elif kind == "text/html" and not plain:
            html.append(re.sub(r"<[^>]*>", " ", body_text(part)))
        if sum(map(len, plain)) >= TEXT_MAX:
            break
    return "\n".join(plain or html)[:TEXT_MAX]


def returned_headers(message: Message) -> Message | None:
    """The headers of the original message a report returns (RFC 6522 section 4: a text/rfc822-headers
    or message/rfc822 part), or None."""
    for part in parts(message):
        kind = part.get_content_type()
        if kind in ("text/rfc822-headers", "text/global-headers"):
            try:
                return HeaderParser().parsestr(body_text(part))
            except Exception:
                return None
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
    return None


def our_message_id(value: str) -> str | None:
    """The message id (upper-case) a Message-ID value names when it has SmartMail's shape, else None."""
    match = _OUR_MESSAGE_ID.search(value)
    return match.group(1).upper() if match else None


def quoted_message_id(text: str) -> str | None:
    """SmartMail's message id from a `Message-ID:` line quoted in a body (non-standard bounces copy
    the original's headers into their text), else None."""
    for match in _QUOTED_MESSAGE_ID.finditer(text):
        found = our_message_id(match.group(1))
        if found:
            return found
    return None
