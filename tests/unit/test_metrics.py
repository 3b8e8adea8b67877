"""Operator metrics: the multiprocess directory, the outcome counts of a delivery window, /metrics' token."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from smartmail.store.models import MessageState
from smartmail.workers import delivery, metrics
from smartmail.workers.outcomes import Reply

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter (prometheus_client reads its environment once, at import)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "SMARTMAIL_METRICS_DIR")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


COUNT_SENT = """
    import os
    from smartmail.workers import metrics
    from prometheus_client import values
    metrics.count_messages({("sent", "google"): %d})
    print(os.environ["PROMETHEUS_MULTIPROC_DIR"], type(values.ValueClass).__name__, values.ValueClass.__name__)
"""


def test_the_directory_is_created_and_set_before_prometheus_client_is_imported(tmp_path):
    directory = tmp_path / "not" / "there"
    out = _python(COUNT_SENT % 2, SMARTMAIL_METRICS_DIR=str(directory))
    assert out.split()[0] == str(directory) and out.split()[-1] == "MmapedValue"  # multiprocess storage
    assert directory.is_dir() and any(p.name.startswith("counter_") for p in directory.iterdir())


def test_metrics_go_to_the_directory_even_when_prometheus_client_came_first(tmp_path):
    # As in a worker started by `celery`, whose command line loads Flower's plugin first.
    _python("import prometheus_client\n" + textwrap.dedent(COUNT_SENT % 1), SMARTMAIL_METRICS_DIR=str(tmp_path))
    assert any(p.name.startswith("counter_") for p in tmp_path.iterdir())


def test_processes_sharing_the_directory_are_summed(tmp_path):
    for count in (2, 3):
        _python(COUNT_SENT % count, SMARTMAIL_METRICS_DIR=str(tmp_path))
    total = _python(
        """
        from prometheus_client import CollectorRegistry, multiprocess
        from smartmail.workers import metrics
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(metrics.DIRECTORY))
        print(registry.get_sample_value("smartmail_messages_total", {"outcome": "sent", "site": "google"}))
        """,
        SMARTMAIL_METRICS_DIR=str(tmp_path),
    )
    assert float(total) == 5


def test_smartmail_metrics_dir_wins_over_an_inherited_prometheus_dir(tmp_path):
    ours, inherited = tmp_path / "ours", tmp_path / "inherited"
    out = _python(COUNT_SENT % 1, SMARTMAIL_METRICS_DIR=str(ours), PROMETHEUS_MULTIPROC_DIR=str(inherited))
    assert out.split()[0] == str(ours)
    # Without ours, the inherited one is kept (a deployment that sets only Prometheus's variable).
    assert _python(COUNT_SENT % 1, PROMETHEUS_MULTIPROC_DIR=str(inherited)).split()[0] == str(inherited)


def test_the_default_directory_is_under_the_temp_dir(tmp_path):
    out = _python(COUNT_SENT % 1, TMPDIR=str(tmp_path))
    assert out.split()[0] == str(tmp_path / "smartmail-metrics")


def _sample(name: str, **labels: str) -> float:
    """This process's own value (its file in the multiprocess directory)."""
    metric = {"smartmail_messages": metrics.messages, "smartmail_throttled": metrics.throttled}[name]
    return metric.labels(**labels)._value.get()


def test_a_window_is_counted_by_outcome_and_site():
    site = "unit-window"
    reply = Reply(250, "ok")
    results = [
        delivery._Result("1", "a@x", MessageState.SENT, reply, site=site, latency=0.3),
        delivery._Result("2", "b@x", MessageState.SENT, reply, site=site, latency=1.5),
        delivery._Result("3", "c@x", MessageState.FAILED, Reply(550, "5.1.1 no such user"), site=site, suppress=True),
        delivery._Result("4", "d@x", MessageState.FAILED, Reply(554, "x"), site=site, reason=delivery.RULE_BOUNCE),
        delivery._Result("5", "e@x", MessageState.FAILED, Reply(554, "5.7.1 policy"), site=site),
        delivery._Result("6", "f@x", MessageState.DEFERRED, Reply(451, "4.3.0 later"), site=site),
        delivery._Result("7", "g@x", MessageState.DEFERRED, Reply(None, "throttled"), site=site, attempted=False),
        delivery._Result("8", "h@x", MessageState.SUPPRESSED, Reply(None, "unsubscribed"), attempted=False),
    ]
    before = {o: _sample("smartmail_messages", outcome=o, site=site) for o in ("sent", "bounced", "failed", "deferred")}
    suppressed = _sample("smartmail_messages", outcome="suppressed", site=metrics.NO_SITE)
    throttled = _sample("smartmail_throttled", site=site)
    latency = metrics.accept_latency.labels("unit-stream")
    observed = latency._sum.get()

    delivery._count(results, "unit-stream")

    after = {o: _sample("smartmail_messages", outcome=o, site=site) - before[o] for o in before}
    assert after == {"sent": 2, "bounced": 2, "failed": 1, "deferred": 1}
    assert _sample("smartmail_messages", outcome="suppressed", site=metrics.NO_SITE) - suppressed == 1
    assert _sample("smartmail_throttled", site=site) - throttled == 1
    assert latency._sum.get() - observed == pytest.approx(1.8)


@pytest.fixture
def scrape(settings_env, monkeypatch):
    monkeypatch.setattr(metrics, "exposition", lambda: b"smartmail_messages_total 1\n")
    from smartmail.web import metrics as route

    app = FastAPI()
    app.include_router(route.router)
    return lambda **headers: TestClient(app).get("/metrics", headers=headers)


def test_metrics_are_open_without_a_token(scrape):
    response = scrape()
    assert response.status_code == 200 and response.text == "smartmail_messages_total 1\n"
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_a_metrics_token_is_asked_for_as_a_bearer_token(scrape, settings_env):
    settings_env.setenv("SMARTMAIL_METRICS_TOKEN", "metrics-token-0123456789")
    from smartmail import runtime

    runtime.reset()
    refused = scrape()
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    assert scrape(authorization="Bearer wrong-token-0123456789").status_code == 401
    assert scrape(authorization="Bearer metrics-token-0123456789").status_code == 200
