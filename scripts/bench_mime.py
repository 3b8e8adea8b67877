"""Benchmark: smartmail.content.mime.build_mime against the EmailMessage builder it replaced."""

from __future__ import annotations

import sys
import timeit
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smartmail.content.mime import build_mime  # noqa: E402


def build_mime_email_message(
    *, sender, recipient, subject, text, html, message_id, reply_to=None, headers=None, date=None
):
    """The previous implementation, verbatim: the baseline."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


def sample(accented: bool) -> dict:
    """A ~7 KB transactional HTML mail with its text alternative."""
    word = "Grüße" if accented else "Hello"
    row = (
        f'<tr><td style="padding:8px;border-bottom:1px solid #eee">{word}, item {{i}}</td>'
        '<td style="text-align:right"><a href="https://example.com/orders/{i}?utm_source=mail">'
        "view order</a></td></tr>\n"
    )
    html = (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>Your receipt</title></head>\n'
        '<body style="font-family:Helvetica,Arial,sans-serif;color:#222">\n<table width="100%">\n'
        + "".join(row.format(i=i) for i in range(36))
        + "</table>\n</body></html>\n"
    )
    text = "".join(f"{word}, item {i}: https://example.com/orders/{i}\n" for i in range(36))
    return dict(
        sender="Shop Team <shop@example.com>",
        recipient='"Doe, Jane" <jane@example.org>',
        subject=f"{word}: your receipt #12345",
        text=text,
        html=html,
        message_id="<01HZX4Q9M3@mail.example.com>",
        reply_to="help@example.com",
        headers={"X-Campaign": "receipts", "List-Unsubscribe": "<https://example.com/u/abc>"},
        date=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


def per_message_us(fn, kwargs: dict) -> float:
    timer = timeit.Timer(lambda: fn(**kwargs))
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def main() -> None:
    print(f"python {sys.version.split()[0]}")
    for label, accented in (("ASCII html", False), ("accented html", True)):
        kwargs = sample(accented)
        old = per_message_us(build_mime_email_message, kwargs)
        new = per_message_us(build_mime, kwargs)
        print(
            f"{label:14} html={len(kwargs['html'].encode()):5d} B  EmailMessage {old:8.1f} us/msg  "
            f"build_mime {new:6.1f} us/msg  speed-up {old / new:5.1f}x"
        )


if __name__ == "__main__":
    main()
