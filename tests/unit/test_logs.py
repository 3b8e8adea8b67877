"""Library use of SmartMail's logs: SMARTMAIL_LOG_LEVEL holds, and an application's own logging setup is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import structlog
{setup}
from smartmail.config import get_settings
get_settings()
log = structlog.get_logger("smartmail.audience")
log.info("contacts.deleted", email="ann@example.org")
log.warning("something.odd", count=2)
"""


def run(setup: str, level: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SMARTMAIL_LOG_LEVEL": level,
        "SMARTMAIL_DEFAULT_SENDER": "me@example.org",
        "SMARTMAIL_SECRET_KEY": "0123456789abcdef0123456789abcdef",
    }
    # A fresh interpreter: structlog's and logging's configuration are process-wide.
    code = SCRIPT.format(setup=textwrap.dedent(setup))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_without_an_application_setup_the_level_holds_and_lines_go_to_stderr():
    done = run("", "WARNING")
    assert done.returncode == 0, done.stderr
    assert "something.odd" in done.stderr and "count=2" in done.stderr
    assert "contacts.deleted" not in done.stderr + done.stdout


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_an_applications_stdlib_logging_gets_the_events(level):
    setup = """
    import logging, sys
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="APP %(levelname)s %(name)s: %(message)s")
    """
    done = run(setup, level)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("APP WARNING smartmail.audience: something.odd") for line in lines), lines
    assert any("contacts.deleted" in line for line in lines) == (level == "INFO")
    assert "something.odd" not in done.stderr


def test_an_applications_structlog_configuration_is_kept():
    setup = """
    import sys
    structlog.configure(
        processors=[lambda _logger, method, event: f"MINE {method} {event['event']}"],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    """
    done = run(setup, "WARNING")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["MINE info contacts.deleted", "MINE warning something.odd"]
