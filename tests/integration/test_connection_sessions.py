"""One connection a site may have, shared by two worker processes: few SMTP sessions, not a reconnect storm."""

from __future__ import annotations

import collections
import time

import pytest
from sqlalchemy import select

import smartmail
from smartmail.store.engine import session_scope
from smartmail.store.models import Message
from tests.conftest import reset_caches, wait_for

pytestmark = pytest.mark.integration


def _states() -> collections.Counter:
    with session_scope() as session:
        return collections.Counter(session.scalars(select(Message.state)))


def test_a_one_connection_site_is_served_by_few_sessions(env, smtp_server, start_worker, monkeypatch, tmp_path):
    # Receivers read a new session every few messages as abuse: the site's one connection lease
    # should stay with the worker sending its mail, not move to whichever worker found it busy.
    policy = tmp_path / "policy.toml"
    policy.write_text('[sites.one]\ndomains = ["example.org"]\nmax_connections = 1\n')
    monkeypatch.setenv("SMARTMAIL_POLICY_FILE", str(policy))
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_BATCH_SIZE", "10")  # ten drains: both processes take the site's mail
    reset_caches()
    start_worker.many(2, concurrency=1)

    recipients = [f"user{i}@example.org" for i in range(100)]
    started = time.monotonic()
    smartmail.send_many([{"to": to, "subject": "Hi", "text": f"Message to {to}"} for to in recipients])
    wait_for(lambda: smtp_server.count >= 100, 60, interval=0.05, message="100 messages at the server")
    elapsed = time.monotonic() - started
    time.sleep(0.5)

    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == sorted(recipients)  # each once
    assert wait_for(lambda: _states().get("sent") == 100, 30, message="all recorded sent")
    assert smtp_server.sessions <= 5, smtp_server.sessions
    # Held back, not slowed down: the one connection keeps the pace of one worker sending it all.
    assert elapsed < 10, elapsed
