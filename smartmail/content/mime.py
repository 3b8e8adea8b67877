"""MIME building: a stored message row becomes the RFC 5322 bytes handed to a transport."""

from __future__ import annotations

import binascii
import random
import re
from datetime import UTC, datetime
from email.utils import format_datetime

# RFC 5322 section 2.1.1: a line SHOULD be at most 78 characters and MUST be at most 998.
_FOLD_AT = 78
_LINE_MAX = 998
# RFC 2045 section 6.7 rule 5: quoted-printable lines are at most 76 characters.
_QP_LINE = 76
# RFC 2047 section 2: an encoded-word is at most 75 characters; "=?utf-8?q?" and "?=" take 12.
_WORD_PAYLOAD = 75 - 12
# RFC 2047 section 5 rule 3: inside a phrase (display names) 'Q' may leave only these bare.
# That alphabet is safe in unstructured fields too, so one encoder serves both.
_PHRASE_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q = {chr(i): "_" if i == 0x20 else chr(i) if chr(i) in _PHRASE_SAFE else f"={i:02X}" for i in range(128)}
_HIGH_BYTES = bytes(range(0x80, 0x100))
# A whitespace run with the word after it: folding (RFC 5322 section 2.2.3) only inserts CRLF
# before whitespace, so unfolding gives back exactly the original value.
_FOLD_CHUNK = re.compile(r"[ \t]*[^ \t]+|[ \t]+")
_QUOTED_PAIR = re.compile(r"\\(.)")  # RFC 5322 section 3.2.1


def build_mime(
    *,
    sender: str,
    recipient: str,
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    reply_to: str | None = None,
    headers: dict[str, str] | None = None,
    date: datetime | None = None,
) -> bytes:
    """multipart/alternative (text first, HTML last, as RFC 2046 section 5.1.4 orders by preference).

    Built by hand rather than with `email.message.EmailMessage`: this runs once per delivered
    message, and the stdlib policy machinery costs far more than the message itself
    (scripts/bench_mime.py, docs/benchmarks.md).
    """
    fields = [_mailbox_field("From", sender), _mailbox_field("To", recipient)]
    if reply_to:
        fields.append(_mailbox_field("Reply-To", reply_to))
    fields.append(_text_field("Subject", subject))
    fields.append("Date: " + (format_datetime(date) if date else _date_now()))
    fields.append("Message-ID: " + message_id)
    if headers:
        fields.extend(_text_field(name, value) for name, value in headers.items())
    fields.append("MIME-Version: 1.0")
    if html is None:
        cte, body = _encode_body(text, delimited=False)
        fields.append('Content-Type: text/plain; charset="utf-8"')
        fields.append("Content-Transfer-Encoding: " + cte)
        return ("\r\n".join(fields) + "\r\n\r\n").encode("ascii") + body
    text_cte, text_body = _encode_body(text, delimited=True)
    html_cte, html_body = _encode_body(html, delimited=True)
    boundary = _boundary(text_body, html_body)
    fields.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"')
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    return b"".join(
        (
            ("\r\n".join(fields) + "\r\n").encode("ascii"),
            delimiter,
            f'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: {text_cte}\r\n\r\n'.encode(
                "ascii"
            ),
            text_body,
            delimiter,
            f'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: {html_cte}\r\n\r\n'.encode(
                "ascii"
            ),
            html_body,
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        )
    )


def _boundary(*bodies: bytes) -> str:
    """Random, and checked against the bodies as RFC 2046 section 5.1.1 requires.

    "=_" can never occur in quoted-printable or base64 output, so only a 7bit body could
    ever clash, and 128 random bits make even that a formality.
    """
    while True:
        # Not secrets.token_hex: a read of os.urandom per message is a system call on the hot path,
        # and a boundary needs to be unique, not secret (the bodies are checked below). The random
        # module reseeds itself in each forked worker process.
        boundary = f"=_{random.getrandbits(128):032x}"
        token = boundary.encode("ascii")
        if not any(token in body for body in bodies):
            return boundary


def _encode_body(text: str, *, delimited: bool) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body with CRLF line ends) for a utf-8 text part.

    `delimited`: a boundary delimiter follows, and the CRLF before it belongs to the delimiter
    (RFC 2046 section 5.1.1), so the body needs no final line break of its own; without one
    the body must end in CRLF and a quoted-printable soft break supplies it when the text
    itself does not end with a line break. Either way the part decodes to exactly `text`,
    up to line breaks, which come out as CRLF.
    """
    if "\r" in text:
        # RFC 2046 section 4.1.1: CRLF is the line break of text; a lone CR or LF counts as one.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    data = text.encode("utf-8")
    # RFC 2045 section 2.7: 7bit data is US-ASCII without NUL in lines of at most 998 octets.
    if (
        text.isascii()
        and "\0" not in text
        and (delimited or not data or data[-1] == 0x0A)
        and max(map(len, data.split(b"\n"))) <= _LINE_MAX
    ):
        return "7bit", data.replace(b"\n", b"\r\n")
    # Quoted-printable keeps mostly-Latin text readable; each high byte costs 3 characters, so
    # past about one byte in six base64 (4 per 3) is the smaller encoding.
    high = len(data) - len(data.translate(None, _HIGH_BYTES)) if not text.isascii() else 0
    if high * 6 > len(data):
        # RFC 2045 section 6.8: text is put in canonical CRLF form before base64.
        return "base64", _base64_lines(data.replace(b"\n", b"\r\n"))
    # b2a_qp copies the line ends it is given (CRLF only if the first one is CRLF, so a text
    # with no line break would get LF soft breaks); feed it LF only and widen every LF after.
    # It already escapes trailing whitespace, "=", NUL, 8-bit bytes and a line of a lone ".".
    body = binascii.b2a_qp(data, istext=True)
    if not delimited and body and body[-1] != 0x0A:
        body = _end_with_soft_break(body)
    return "quoted-printable", body.replace(b"\n", b"\r\n")


def _base64_lines(data: bytes) -> bytes:
    """base64 in 76-character CRLF lines (RFC 2045 section 6.8)."""
    b2a = binascii.b2a_base64
    return b"".join(b2a(data[i : i + 57], newline=False) + b"\r\n" for i in range(0, len(data), 57))


def _end_with_soft_break(body: bytes) -> bytes:
    """Append "=" + line break, so the message ends in CRLF without adding one to the text."""
    start = body.rfind(b"\n") + 1
    last = body[start:]
    if len(last) < _QP_LINE:
        return body + b"=\n"
    # The "=" would make a 77-character line: break it earlier, never inside an "=XX" escape.
    cut = _QP_LINE - 1
    if last[cut - 1] == 0x3D:
        cut -= 1
    elif last[cut - 2] == 0x3D:
        cut -= 2
    return body[:start] + last[:cut] + b"=\n" + last[cut:] + b"=\n"


def _text_field(name: str, value: str) -> str:
    """An unstructured field (RFC 5322 section 3.2.5), RFC 2047-encoded unless plain ASCII."""
    prefix = name + ": "
    # ASCII that merely looks like an encoded-word would be decoded by the reader; encode it.
    if value.isascii() and not ("=?" in value and "?=" in value):
        folded = _fold(prefix, value)
        if folded is not None:
            return folded
    return prefix + "\r\n ".join(_encoded_words(value, _FOLD_AT - len(prefix)))


def _date_now() -> str:
    """The Date header for now, formatted once a second rather than per message (format_datetime is slow)."""
    global _last_date
    now = datetime.now(UTC).replace(microsecond=0)
    last = _last_date  # one read: sending threads may replace it meanwhile
    if last[0] != now:
        last = _last_date = (now, format_datetime(now))
    return last[1]


_last_date: tuple[datetime | None, str] = (None, "")


def _mailbox_field(name: str, mailbox: str) -> str:
    """`Name <addr>`, `"Quoted, Name" <addr>` or `addr`, display name RFC 2047-encoded if needed."""
    prefix = name + ": "
    phrase, angle, addr = mailbox.rpartition("<")
    phrase = phrase.strip()
    if mailbox.isascii() and "=?" not in phrase:
        folded = _fold(prefix, mailbox)
        if folded is not None:
            return folded
    addr = addr.strip()
    if not angle or not phrase or not addr.isascii():
        # Validated mailboxes never get here; a non-ASCII address would need SMTPUTF8 (RFC 6531).
        raise ValueError(f"{name}: cannot encode {mailbox!r} as an RFC 5322 mailbox")
    if len(phrase) >= 2 and phrase[0] == phrase[-1] == '"':
        # RFC 2047 section 5: an encoded-word replaces the whole quoted-string, never sits in one.
        phrase = _QUOTED_PAIR.sub(r"\1", phrase[1:-1])
    words = _encoded_words(phrase, _FOLD_AT - len(prefix))
    route = "<" + addr
    used = len(words[-1]) + (len(prefix) if len(words) == 1 else 1)
    if used + 1 + len(route) > _FOLD_AT:
        words.append(route)
    else:
        words[-1] += " " + route
    return prefix + "\r\n ".join(words)


def _fold(prefix: str, value: str) -> str | None:
    """`prefix + value` folded before whitespace; None if a line would still pass 998 octets."""
    line = prefix + value
    if len(line) <= _FOLD_AT:
        return line
    lines: list[str] = []
    line = prefix
    for chunk in _FOLD_CHUNK.findall(value):
        # Break only before whitespace with a word after it: a line of nothing but whitespace
        # is obsolete syntax (RFC 5322 section 4.2).
        if len(line) + len(chunk) > _FOLD_AT and line != prefix and not chunk.isspace() and chunk[0] in " \t":
            lines.append(line)
            line = chunk
        else:
            line += chunk
    lines.append(line)
    if max(map(len, lines)) > _LINE_MAX:
        return None
    return "\r\n".join(lines)


def _encoded_words(value: str, room: int) -> list[str]:
    """RFC 2047 encoded-words of whole characters (section 5), each at most 75 characters.

    `room` is what is left of the first line; later words sit on continuation lines. 'Q' or
    'B', whichever is shorter, as the stdlib does.
    """
    first = max(room - 12, 12)
    q = [_Q.get(ch) or "".join(f"={b:02X}" for b in ch.encode("utf-8")) for ch in value]
    raw = value.encode("utf-8")
    if sum(map(len, q)) <= 4 * -(-len(raw) // 3):
        return [
            "=?utf-8?q?" + "".join(chunk) + "?="
            for chunk in _chunks(q, [len(piece) for piece in q], first, _WORD_PAYLOAD)
        ]
    sizes = [len(ch.encode("utf-8")) for ch in value]
    # n octets take 4 * ceil(n / 3) base64 characters.
    return [
        "=?utf-8?b?" + binascii.b2a_base64("".join(chunk).encode("utf-8"), newline=False).decode("ascii") + "?="
        for chunk in _chunks(list(value), sizes, 3 * (first // 4), 3 * (_WORD_PAYLOAD // 4))
    ]


def _chunks(units: list[str], sizes: list[int], first: int, rest: int) -> list[list[str]]:
    """Greedy split of `units` so each chunk's sizes sum to at most `first`, then `rest`."""
    chunks: list[list[str]] = []
    current: list[str] = []
    used, limit = 0, first
    for unit, size in zip(units, sizes):
        if current and used + size > limit:
            chunks.append(current)
            current, used, limit = [], 0, rest
        current.append(unit)
        used += size
    chunks.append(current)
    return chunks
