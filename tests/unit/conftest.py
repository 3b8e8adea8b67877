"""Unit tests: fakes only (fakeredis, in-memory transports, frozen clocks), no server or process.

Every test in this folder is marked `unit` (`pytest -m unit` runs them alone, in under a minute).
Fixtures shared by several unit modules belong here; the real Redis, database, SMTP server and
worker fixtures are in tests/integration/conftest.py, out of these tests' reach.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smartmail import runtime

HERE = Path(__file__).resolve().parent
SECRET = "unit-test-secret-0123456789"  # tests/fixtures/inbound: its VERP addresses and tokens are signed with it


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def settings_env(monkeypatch):
    """Only the required SMARTMAIL_* variables (sender `News <news@example.com>`, SECRET), read
    afresh; set more on the monkeypatch it returns, then `runtime.reset()`."""
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAIL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", "News <news@example.com>")
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", SECRET)
    runtime.reset()
    yield monkeypatch
    runtime.reset()
