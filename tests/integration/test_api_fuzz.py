"""schemathesis against a real `smartmail web` on PostgreSQL: every operation of /v1/openapi.json
fuzzed (stateless) and chained through the links it infers (stateful); no 5xx, every status and body
as documented. SMARTMAIL_TEST_FUZZ_EXAMPLES sets the examples per operation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smartmail.web.app import app

EXAMPLES = int(os.environ.get("SMARTMAIL_TEST_FUZZ_EXAMPLES", "10"))
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


@pytest.fixture
def _unlimited(database_url, env, monkeypatch):
    if database_url.startswith("sqlite"):
        pytest.skip("fuzzed on PostgreSQL only: SQLite's single writer is not what is under test")
    monkeypatch.setenv("SMARTMAIL_API_RATE_LIMIT", "100000")  # a rate the fuzzer never meets


@pytest.fixture
def fuzzed_api(_unlimited, api):
    """`api` on PostgreSQL, its keys never rate-limited."""
    return api


def schemathesis(api, token: str, *options: str, phases: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = [
        os.path.join(os.path.dirname(sys.executable), "schemathesis"),
        "run",
        f"{api.url}/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        CHECKS,
        "--phases",
        phases,
        "--max-examples",
        str(EXAMPLES),
        "--workers",
        "1",  # hypothesis' lambda descriptions call ast.parse, which CPython 3.11 cannot run in threads
        "--seed",
        os.environ.get("SMARTMAIL_TEST_FUZZ_SEED", "18"),
        "--suppress-health-check",
        "all",
        "--request-timeout",
        "30",
        *options,
    ]
    # In a directory of the test's own: schemathesis keeps a cache (.schemathesis/) where it runs.
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"}, cwd=cwd
    )
    print(result.stdout)  # its report, for `pytest -rP`: coverage, links followed, warnings
    return result


# Revoking keys is fuzzed on its own: it would revoke the very key the other operations are fuzzed with.
REVOKES = r"^DELETE /v1/keys/"


def test_every_operation_fuzzed_no_5xx_and_as_documented(fuzzed_api, tmp_path):
    failures = []
    result = schemathesis(
        fuzzed_api,
        fuzzed_api.key(),
        "--exclude-name-regex",
        REVOKES,
        phases="examples,coverage,fuzzing,stateful",
        cwd=tmp_path,
    )
    if result.returncode != 0:
        failures.append(result.stdout[-20000:] + result.stderr[-5000:])
    names = [f"{m.upper()} {path}" for path, ops in app.openapi()["paths"].items() for m in ops]
    if any(re.match(REVOKES, name) for name in names):
        result = schemathesis(
            fuzzed_api,
            fuzzed_api.key(),
            "--include-name-regex",
            REVOKES,
            phases="examples,coverage,fuzzing",
            cwd=tmp_path,
        )
        if result.returncode != 0:
            failures.append(result.stdout[-20000:] + result.stderr[-5000:])
    assert not failures, "\n".join(failures)
