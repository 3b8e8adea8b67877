"""/metrics scraped from a real `smartmail web` while a real worker delivers: the counters match the database."""

from __future__ import annotations

import collections

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import smartmail
from smartmail.audience.contacts import add_members, create_list
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content.template_store import save_template
from smartmail.store.engine import session_scope
from smartmail.store.models import Message
from tests.conftest import reset_caches, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def metrics_dir(env, monkeypatch, tmp_path):
    """A multiprocess directory of this test's own, for the web and worker processes it starts."""
    directory = tmp_path / "metrics"
    monkeypatch.setenv("SMARTMAIL_METRICS_DIR", str(directory))
    return directory


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    reset_caches()
    return smtp_server


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics, by name and sorted labels."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over every label set that has `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, key), value in samples.items() if n == name and wanted <= set(key))


def states() -> collections.Counter:
    with session_scope() as session:
        return collections.Counter(
            dict(session.execute(select(Message.state, func.count()).group_by(Message.state)).all())
        )


def test_scraped_counters_equal_the_database(metrics_dir, relay, api, start_worker):
    start_worker(concurrency=2)
    relay.script["later@example.org"] = ["451 4.3.0 Try again later"]
    relay.script["gone@example.org"] = ["550 5.1.1 No such user"]
    recipients = [f"p{i}@example{i % 3}.org" for i in range(30)] + ["later@example.org", "gone@example.org"]
    for to in recipients:
        smartmail.send(to, subject="Hello", text="Hello from the metrics test.")
    smartmail.flush()

    final = wait_for(
        lambda: (c := states()) and c["sent"] + c["failed"] == len(recipients) and c,
        120,
        interval=0.2,
        message=lambda: f"every message sent or failed: {states()}",
    )
    assert final["sent"] == 31 and final["failed"] == 1

    # Counted once the outcomes are committed, so a scrape may trail the database by a moment.
    samples = wait_for(
        lambda: (s := scrape(api.url)) and total(s, "smartmail_messages_total", outcome="sent") == final["sent"] and s,
        30,
        message=lambda: f"sent counter {total(scrape(api.url), 'smartmail_messages_total', outcome='sent')}",
    )
    assert total(samples, "smartmail_messages_total", outcome="bounced") == 1  # the 5.1.1 hard bounce
    assert total(samples, "smartmail_messages_total", outcome="deferred") == 1  # the 451, before its retry
    assert total(samples, "smartmail_messages_total", outcome="failed") == 0
    assert total(samples, "smartmail_accept_latency_seconds_count") == final["sent"]
    assert total(samples, "smartmail_accept_latency_seconds_bucket", le="+Inf") == final["sent"]
    # The gauges read at scrape time: nothing is left waiting.
    assert total(samples, "smartmail_metrics_source_up", source="redis") == 1
    assert total(samples, "smartmail_metrics_source_up", source="database") == 1
    assert total(samples, "smartmail_messages_backlog", state="queued") == 0
    assert total(samples, "smartmail_messages_backlog", state="deferred") == 0
    assert ("smartmail_outbox_backlog", (("stream", "transactional"),)) in samples
    # The worker wrote the counters, in files of its own processes' ids.
    assert any(path.name.startswith("counter_") for path in metrics_dir.iterdir())


def test_scraped_while_a_campaign_runs_through_bulk_workers(metrics_dir, relay, api, start_worker):
    start_worker(concurrency=2, queues="bulk")
    create_list("news")
    add_members("news", [f"r{i}@site{i % 4}.example" for i in range(120)])
    with session_scope() as session:
        save_template(session, "metrics-news", subject="News", html="<p>News for {{ email }}</p>")
    campaigns.create_campaign("metrics", template="metrics-news", lists=["news"])
    campaigns.launch_campaign("metrics")

    # Mid-campaign, the counters never run ahead of the database.
    seen = scrape(api.url)
    assert total(seen, "smartmail_messages_total", outcome="sent") <= states()["sent"]
    wait_for(lambda: states()["sent"] == 120, 120, interval=0.2, message=lambda: f"the campaign sent: {states()}")
    samples = wait_for(
        lambda: (s := scrape(api.url)) and total(s, "smartmail_messages_total", outcome="sent") == 120 and s,
        30,
        message=lambda: f"sent counter {total(scrape(api.url), 'smartmail_messages_total', outcome='sent')}",
    )
    assert total(samples, "smartmail_accept_latency_seconds_count", stream="bulk") == 120
    assert total(samples, "smartmail_messages_backlog", state="queued") == 0


def test_import_rows_are_counted_as_the_job_reports_them(metrics_dir, api, start_worker):
    start_worker(concurrency=1, queues="imports")
    client = api.client("contacts:write", "contacts:read")
    csv = b"email,first_name\r\nann@example.org,Ann\r\nnot-an-address,Bob\r\ndee@example.org,Dee\r\n"
    response = client.post("/v1/imports", files={"file": ("people.csv", csv, "text/csv")})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = wait_for(
        lambda: (j := client.get(f"/v1/imports/{job_id}").json()) and j["state"] in ("done", "failed") and j, 60
    )
    assert job["state"] == "done" and (job["created"], job["failed"]) == (2, 1)

    samples = scrape(api.url)
    assert total(samples, "smartmail_import_rows_total", outcome="created") == job["created"]
    assert total(samples, "smartmail_import_rows_total", outcome="failed") == job["failed"]
    assert total(samples, "smartmail_import_rows_total", outcome="updated") == job["updated"]


def test_a_metrics_token_closes_the_endpoint(metrics_dir, monkeypatch, env, _module_web):
    monkeypatch.setenv("SMARTMAIL_METRICS_TOKEN", "metrics-token-0123456789")
    reset_caches()
    url = _module_web.start()
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert "smartmail_metrics_source_up" in "".join(
        key[0] for key in scrape(url, authorization="Bearer metrics-token-0123456789")
    )
