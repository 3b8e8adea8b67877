"""Unit tests: fakes only (fakeredis, in-memory transports, frozen clocks), no server or process.

Every test in this folder is marked `unit` (`pytest -m unit` runs them alone, in under a minute).
Fixtures shared by several unit modules belong here; the real Redis, database, SMTP server and
worker fixtures are in tests/integration/conftest.py, out of these tests' reach.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.unit)
