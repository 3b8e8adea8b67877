"""The naive baseline of the benchmarks: one Celery task per email, rendered and sent over a new connection.

This is deliberately what people write first (Celery's defaults throughout: early acks, prefetch 4,
pickle-free json, no result backend configured). Configured by environment variables so the
benchmark can point it at its own broker and SMTP sink:

    NAIVE_BROKER_URL     redis://127.0.0.1:6379/0
    NAIVE_SMTP_HOST      127.0.0.1
    NAIVE_SMTP_PORT      25
    NAIVE_TEMPLATES_DIR  the repository's templates/
    NAIVE_SENDER         Example <noreply@example.com>

Run a worker with `celery -A naive_baseline worker` from this directory (or with it on PYTHONPATH).
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage
from pathlib import Path

from celery import Celery
from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES_DIR = os.environ.get("NAIVE_TEMPLATES_DIR", str(Path(__file__).resolve().parents[1] / "templates"))
SMTP_HOST = os.environ.get("NAIVE_SMTP_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("NAIVE_SMTP_PORT", "25"))
SENDER = os.environ.get("NAIVE_SENDER", "Example <noreply@example.com>")

app = Celery("naive_baseline", broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.broker_connection_retry_on_startup = True  # only silences a start-up warning

# The environment is module-level, so each worker process compiles a template once.
jinja = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape())


@app.task
def send_email(to: str, template: str, context: dict) -> None:
    subject = jinja.get_template(f"{template}/subject.txt").render(context).strip()
    html = jinja.get_template(f"{template}/body.html").render(context)

    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(html, subtype="html")

    with smtplib.SMTP(SMTP_HOST, SMTP_PORT) as smtp:  # a new connection per email; QUIT on exit
        smtp.send_message(msg)
