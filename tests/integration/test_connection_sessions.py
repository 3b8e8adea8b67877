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


def test_one_connection_site_is_served_by_few_sessions(env, smtp_server, start_worker, monkeypatch, tmp_path):
    # Receivers read a session per few messages as abuse: the site's one connection lease should
    # stay with a worker that has its work, not bounce between workers closing and reopening it.
    policy = tmp_path / "policy.toml"
    policy.write_text('[sites.one]\ndomains = ["example.org"]\nmax_connections = 1\n')
    monkeypatch.setenv("SMARTMAIL_POLICY_FILE", str(policy))
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    reset_caches()
    import os
    mode = os.environ.get("XMODE", "a")
    if mode in ("a", "b"):
        start_worker.many(2, concurrency=1)
    else:
        start_worker(concurrency=2)

    recipients = [f"user{i}@example.org" for i in range(100)]
    started = time.monotonic()
    if mode in ("b", "d"):
        smartmail.send_many([{"to": to, "subject": "Hi", "text": f"Message to {to}"} for to in recipients])
    else:
      for to in recipients:  # one call per message, as an application sends: drains start in both workers
        smartmail.send(to, subject="Hi", text=f"Message to {to}")
    wait_for(lambda: smtp_server.count >= 100, 60, interval=0.05, message="100 messages at the server")
    elapsed = time.monotonic() - started
    time.sleep(0.5)

    got = sorted(m.rcpt_tos[0] for m in smtp_server.messages)
    assert got == sorted(recipients)  # every message, exactly once
    assert wait_for(lambda: _states().get("sent") == 100, 30, message="all recorded sent")
    print(f"sessions={smtp_server.sessions} elapsed={elapsed:.2f}s")
    assert smtp_server.sessions <= 5, smtp_server.sessions
