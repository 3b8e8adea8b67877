"""Unit tests for SMARTMAIL_WEB_THREADS: the web app caps its thread pool and sizes the database pools to match."""

from __future__ import annotations

import anyio
import anyio.to_thread
import pytest

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.store import engine as db
from smartmail.web.app import create_app


@pytest.fixture
def postgres_settings(monkeypatch, tmp_path):
    # Engines are made, never connected: no server is needed.
    monkeypatch.setenv("SMARTMAIL_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("SMARTMAIL_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", "App <app@example.com>")
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", "unit-test-secret-key-0123456789")
    monkeypatch.setenv("SMARTMAIL_WEB_THREADS", "17")
    get_settings.forget()
    runtime.reset()
    yield
    runtime.reset()
    get_settings.forget()


def test_the_lifespan_caps_the_thread_pool_and_sizes_both_engines_pools(postgres_settings):
    app = create_app()

    async def start() -> int:
        async with app.router.lifespan_context(app):
            return anyio.to_thread.current_default_thread_limiter().total_tokens

    assert anyio.run(start) == 17
    assert db.get_engine().pool.size() == 17
    assert db._statement_engine().pool.size() == 17
    assert db.session_factory().kw["bind"] is db.get_engine()


def test_other_processes_keep_the_default_pools(postgres_settings):
    db.serve_threads(3)  # fewer threads than the default pool: the pool stays as it is
    assert db.get_engine().pool.size() == db.POOL_SIZE
    db.serve_threads(17)
    runtime.reset()
    assert db.get_engine().pool.size() == db.POOL_SIZE
