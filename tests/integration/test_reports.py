"""Reports on SQLite and PostgreSQL: trend series from the roll-ups, a campaign's domains and links, the
`smartmail report` CLI (table, JSON, CSV, HTML), /v1/analytics with its scope, the scheduled report email."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from sqlalchemy import func, insert, select
from typer.testing import CliRunner

from smartmail.analytics import report_mail, trends
from smartmail.analytics.rollups import DAY, HOUR, bucket_start
from smartmail.cli.main import app as cli
from smartmail.errors import InvalidInput
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Campaign, Event, Message, Rollup
from tests.conftest import reset_caches
from tests.integration.conftest import sent_message

DAY0 = bucket_start(utcnow() - timedelta(days=2), DAY)
# Counters of day 0 and day 2 (day 1 has none), for the campaign and for all mail alike.
FIRST = {"sent": 100, "failed": 2, "bounced_hard": 5, "opened_unique_human": 40, "clicked_messages_human": 10}
THIRD = {"sent": 50, "opened_unique_human": 5}


def _campaign() -> int:
    with get_engine().begin() as connection:
        return connection.execute(
            insert(Campaign).values(name="spring sale", state="sent", template_name="news", sender="n@example.com")
        ).inserted_primary_key[0]


def _rollups(campaign_id: int) -> None:
    rows = []
    for dimension, value in (("all", ""), ("campaign", str(campaign_id))):
        for day, counts in ((DAY0, FIRST), (DAY0 + timedelta(days=2), THIRD)):
            for metric, count in counts.items():
                for granularity in (DAY, HOUR):
                    start = day + timedelta(hours=9) if granularity == HOUR else day
                    rows.append(
                        {
                            "dimension": dimension,
                            "value": value,
                            "granularity": granularity,
                            "bucket_start": start,
                            "metric": metric,
                            "count": count,
                        }
                    )
    with get_engine().begin() as connection:
        connection.execute(insert(Rollup), rows)


def _messages_and_clicks(campaign_id: int) -> None:
    ids = [sent_message(f"a{i}@Example.org", campaign_id=campaign_id) for i in range(3)]
    sent_message("b0@example.org", state="bounced", campaign_id=campaign_id)
    sent_message("c0@gmail.com", state="failed", campaign_id=campaign_id)
    sent_message("c1@gmail.com", campaign_id=campaign_id)
    sent_message("other@gmail.com")  # not the campaign's
    clicks = [
        (ids[0], "https://example.com/a", True, False),
        (ids[0], "https://example.com/a", False, False),
        (ids[1], "https://example.com/a", True, False),
        (ids[1], "https://example.com/b", True, False),
        (ids[2], "https://example.com/b", True, True),  # a link scanner: left out
    ]
    with get_engine().begin() as connection:
        connection.execute(
            insert(Event),
            [
                {
                    "type": "clicked",
                    "message_id": message_id,
                    "campaign_id": campaign_id,
                    "contact_id": None,
                    "machine": machine,
                    "properties": {"url": url, "link": 0, "unique": unique},
                    "occurred_at": DAY0,
                }
                for message_id, url, unique, machine in clicks
            ],
        )


@pytest.fixture
def history(env):
    campaign_id = _campaign()
    _rollups(campaign_id)
    _messages_and_clicks(campaign_id)
    return campaign_id


# --- The Python API ------------------------------------------------------------------------------


def test_series_has_every_bucket_with_kpis(history):
    buckets = trends.series(since=DAY0, until=DAY0 + timedelta(days=2, hours=5))
    assert [b["start"] for b in buckets] == [DAY0 + timedelta(days=i) for i in range(3)]
    assert buckets[0]["counts"] == FIRST
    assert buckets[1]["counts"] == {}
    assert buckets[1]["kpis"]["delivery_rate"]["value"] is None
    delivery = buckets[0]["kpis"]["delivery_rate"]
    assert (delivery["numerator"], delivery["denominator"]) == (95, 102)
    hourly = trends.campaign_series(history, since=DAY0, until=DAY0 + timedelta(days=1), granularity=HOUR)
    assert len(hourly) == 25
    assert hourly[9]["counts"] == FIRST
    assert sum(1 for b in hourly if b["counts"]) == 1


def test_series_refuses_bad_input_naming_the_field(history):
    with pytest.raises(InvalidInput) as caught:
        trends.series(since=DAY0, granularity="week")
    assert caught.value.field == "granularity"
    with pytest.raises(InvalidInput) as caught:
        trends.series(since=DAY0, until=DAY0 - timedelta(days=1))
    assert caught.value.field == "until"
    with pytest.raises(InvalidInput) as caught:
        trends.series(since=DAY0 - timedelta(days=200), granularity=HOUR)
    assert caught.value.field == "since"


def test_domains_and_top_links_of_one_campaign(history):
    table = {row["domain"]: row for row in trends.domains(history)}
    assert set(table) == {"example.org", "gmail.com"}  # other@gmail.com's message is not the campaign's
    example, gmail = table["example.org"], table["gmail.com"]
    assert (example["messages"], example["sent"], example["bounced"], example["delivered"]) == (4, 4, 1, 3)
    assert example["delivery_rate"] == 3 / 4 and example["bounce_rate"] == 1 / 4
    assert (gmail["sent"], gmail["failed"], gmail["delivery_rate"]) == (1, 1, 1 / 2)
    assert trends.top_links(history) == [
        {"url": "https://example.com/a", "clicks": 3, "unique": 2},
        {"url": "https://example.com/b", "clicks": 1, "unique": 1},
    ]


def test_a_campaign_report_spans_its_roll_ups(history):
    report = trends.campaign_report("spring sale")
    assert report["campaign"]["id"] == history
    assert report["granularity"] == HOUR  # 2 days of roll-ups: by the hour
    assert report["series"][0]["start"] == DAY0 + timedelta(hours=9)
    assert report["series"][-1]["start"] == DAY0 + timedelta(days=2, hours=9)
    assert report["kpis"]["delivery_rate"]["numerator"] == 145


# --- The CLI -------------------------------------------------------------------------------------


@pytest.fixture
def runner(env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    reset_caches()
    return CliRunner()


def run(runner: CliRunner, *argv: str, code: int = 0) -> str:
    result = runner.invoke(cli, ["report", *argv])
    assert result.exit_code == code, result.output
    return result.output


class _Svg(HTMLParser):
    """The points of the page's charts, and whether it loads anything from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs, self.points, self.external = 0, [], []

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        self.svgs += tag == "svg"
        if tag == "circle":
            self.points.append((found["data-metric"], int(found["data-value"])))
        if tag in ("script", "link", "img") or (found.get("src") or "").startswith("http"):
            self.external.append(tag)


def _parsed(path) -> _Svg:
    parser = _Svg()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_campaign_as_table_json_csv_and_html(history, runner, tmp_path):
    output = run(runner, "campaign", "spring sale")
    assert "delivery_rate" in output and "95.4%" in output  # 145 / 152
    assert "example.org" in output and "https://example.com/a" in output
    assert "█" in output  # the terminal chart

    report = json.loads(run(runner, "campaign", "spring sale", "--format", "json"))
    delivery = report["kpis"]["delivery_rate"]
    assert (delivery["numerator"], delivery["denominator"], delivery["value"]) == (145, 152, 145 / 152)
    assert report["series"][0]["start"].endswith("Z")

    lines = list(csv.reader(io.StringIO(run(runner, "campaign", "spring sale", "--format", "csv"))))
    assert lines[0] == ["kpi", "value", "numerator", "denominator"]
    assert ["delivery_rate", str(145 / 152), "145", "152"] in lines

    page = tmp_path / "campaign.html"
    run(runner, "campaign", str(history), "--html", str(page))
    parsed = _parsed(page)
    assert parsed.svgs >= 2 and not parsed.external  # the trend and the links' bars, nothing loaded
    assert ("sent", 100) in parsed.points and ("sent", 50) in parsed.points
    assert "spring sale" in page.read_text()

    assert "no campaign named 'nope'" in run(runner, "campaign", "nope", code=1)


def test_report_trends_as_table_json_csv_and_html(history, runner, tmp_path):
    output = run(runner, "trends", "--since", "3d")
    assert "█" in output and "150" in output  # 100 + 50 sent over the period

    report = json.loads(run(runner, "trends", "--since", DAY0.isoformat(), "--by", "day", "--format", "json"))
    assert [b["counts"].get("sent", 0) for b in report["series"]][:3] == [100, 0, 50]
    assert report["counts"]["sent"] == 150 and report["campaign"] is None

    text = run(runner, "trends", "--since", DAY0.isoformat(), "--campaign", "spring sale", "--format", "csv")
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [line["sent"] for line in lines[:3]] == ["100", "0", "50"]
    assert lines[1]["delivery_rate"] == ""  # nothing to divide by: no rate

    page = tmp_path / "trends.html"
    run(runner, "trends", "--since", "3d", "--by", "hour", "--html", str(page))
    parsed = _parsed(page)
    assert parsed.svgs == 1 and not parsed.external
    assert ("sent", 100) in parsed.points and ("sent", 0) in parsed.points


def test_report_trends_names_the_bad_option(history, runner):
    assert "--since" in run(runner, "trends", "--since", "yesterday", code=2)
    assert "--since" in run(runner, "trends", "--since", "400d", "--by", "hour", code=2)
    assert "--until" in run(runner, "trends", "--since", "1d", "--until", "2001-01-01", code=2)
    assert "--by" in run(runner, "trends", "--by", "week", code=2)
    assert "--campaign" in run(runner, "trends", "--campaign", "nope", code=1)


def test_report_trends_of_a_tag_and_a_rebuild_from_the_events(history, runner):
    with get_engine().begin() as connection:
        connection.execute(
            insert(Rollup),
            [
                {"dimension": "tag", "value": "spring", "granularity": DAY, "bucket_start": DAY0, "metric": "sent"}
                | {"count": 7}
            ],
        )
    report = json.loads(run(runner, "trends", "--since", DAY0.isoformat(), "--tag", "spring", "--format", "json"))
    assert report["tag"] == "spring" and report["counts"]["sent"] == 7
    assert "--tag" in run(runner, "trends", "--campaign", "spring sale", "--tag", "spring", code=2)
    # The hand-made roll-ups above have no events behind them: a rebuild leaves the events' counts only.
    assert "rebuilt from" in run(runner, "rebuild")
    with get_engine().connect() as connection:
        counted = dict(
            connection.execute(
                select(Rollup.metric, func.sum(Rollup.count))
                .where(Rollup.dimension == "all", Rollup.granularity == DAY)
                .group_by(Rollup.metric)
            ).all()
        )
    assert counted == {"clicked_human": 4, "clicked_machine": 1, "clicked_unique_human": 3, "clicked_messages_human": 2}


# --- HTTP ----------------------------------------------------------------------------------------


def test_api_analytics_with_its_scope(history, api):
    reader = api.client("analytics:read")
    found = reader.get("/v1/analytics/campaigns/spring sale")
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["campaign"]["id"] == history and body["counts"]["sent"] == 150
    assert body["kpis"]["bounce_rate"]["numerator"] == 5 and body["kpis"]["bounce_rate"]["denominator"] == 150
    assert "sent" in body["kpis"]["bounce_rate"]["denominator_is"]

    trend = reader.get(
        "/v1/analytics/trends", params={"since": DAY0.isoformat(), "granularity": "day", "campaign": str(history)}
    )
    assert trend.status_code == 200, trend.text
    series = trend.json()["series"]
    assert [b["counts"].get("sent", 0) for b in series][:3] == [100, 0, 50]
    assert series[0]["start"] == DAY0.isoformat() + "Z"

    assert reader.get("/v1/analytics/campaigns/nope").status_code == 404
    unknown = reader.get("/v1/analytics/trends", params={"campaign": "nope"})
    assert unknown.status_code == 422 and "campaign" in unknown.text
    bad = reader.get("/v1/analytics/trends", params={"since": DAY0.isoformat(), "until": "2001-01-01T00:00:00"})
    assert bad.status_code == 422 and "until" in bad.text
    assert api.client("campaigns:read").get("/v1/analytics/trends").status_code == 403


# --- The scheduled email -------------------------------------------------------------------------


def test_the_report_is_emailed_once_per_interval(history, monkeypatch):
    from smartmail.tasks import analytics as tasks

    assert report_mail.send_report() == []  # no recipients: off
    monkeypatch.setenv("SMARTMAIL_REPORT_RECIPIENTS", '["boss@example.org", "ops@example.org"]')
    reset_caches()
    tasks.send_report()  # the beat task
    again = report_mail.send_report()
    assert all(result.duplicate for result in again)  # the same interval: nothing more
    with get_engine().connect() as connection:
        mails = connection.execute(
            select(Message.recipient, Message.subject, Message.html).where(
                Message.recipient.in_(["boss@example.org", "ops@example.org"])
            )
        ).all()
    assert sorted(m.recipient for m in mails) == ["boss@example.org", "ops@example.org"]
    assert all("<svg" in (m.html or "") and m.subject.startswith("SmartMail report") for m in mails)
    assert 'data-value="150"' not in mails[0].html and 'data-value="100"' in mails[0].html
