"""A/B tests of campaigns on real parts: the split fanned out, variants delivered by a worker to an SMTP
server, opens made through the tracking endpoint, the winner picked on the scheduler's clock and sent
to the rest, and the report checked against the events."""

from __future__ import annotations

import collections
import re
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import distinct, func, insert, select, update

from smartmail.campaigns import ab_tests
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content.template_store import save_template
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Campaign, Contact, EngagementFirst, Event, Message
from smartmail.store.sql import fan_out as fan_out_sql
from tests.conftest import reset_caches, wait_for
from tests.integration.test_campaigns import make_audience

pytestmark = pytest.mark.integration

HUMAN = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0"
PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
HTML = '<html><body><p>Hello {{ first_name }}.</p><p><a href="https://shop.example/p">Shop</a></p></body></html>'
_PIXEL = re.compile(r"https://mail\.example\.com(/t/o/[A-Za-z0-9._-]*[A-Za-z0-9_-])")
SUBJECTS = {"A": "Our spring news", "B": "{{ first_name }}, our spring news"}


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_PUBLIC_URL", "https://mail.example.com")
    reset_caches()
    with session_scope() as session:
        save_template(session, "news", subject="News", html=HTML)
        save_template(
            session, "news-long", subject="Long news", html="<html><body><p>Long {{ plan }}</p></body></html>"
        )
    return smtp_server


def contacts_by_email() -> dict[str, tuple[int, dict]]:
    with session_scope() as session:
        return {c.email: (c.id, c.attributes) for c in session.scalars(select(Contact))}


def campaign_rows(name: str) -> list:
    with session_scope() as session:
        campaign_id = session.scalar(select(Campaign.id).where(Campaign.name == name))
        return session.execute(
            select(Message.recipient, Message.variant, Message.state, Message.sender, Message.headers, Message.send_at)
            .where(Message.campaign_id == campaign_id)
            .order_by(Message.contact_id)
        ).all()


def delivered(relay) -> dict[str, list]:
    found = collections.defaultdict(list)
    for message in relay.messages:
        found[message.rcpt_tos[0]].append(message.parsed())
    return found


def settled(relay, count: int, seconds: float = 1.5) -> None:
    """Wait for `count` messages at the relay, then a moment more: no further one arrives."""
    wait_for(lambda: relay.count >= count, 90, message=f"{count} messages delivered")
    time.sleep(seconds)
    assert relay.count == count


def independent_counts(name: str) -> dict[str, dict[str, int]]:
    """Per variant, from `messages` and `events` directly: test messages sent, and the distinct
    messages with a human `opened` and a human `clicked` event."""
    with session_scope() as session:
        campaign_id = session.scalar(select(Campaign.id).where(Campaign.name == name))
        of_test = (Message.campaign_id == campaign_id, Message.variant.isnot(None))
        sent = dict(
            session.execute(
                select(Message.variant, func.count()).where(*of_test, Message.state == "sent").group_by(Message.variant)
            ).all()
        )
        counts = {variant: {"sent": n, "opens": 0, "clicks": 0} for variant, n in sent.items()}
        for kind, key in (("opened", "opens"), ("clicked", "clicks")):
            for variant, n in session.execute(
                select(Message.variant, func.count(distinct(Event.message_id)))
                .join(Message, Message.id == Event.message_id)
                .where(*of_test, Event.type == kind, Event.machine.is_(False))
                .group_by(Message.variant)
            ):
                counts[variant][key] = n
    return counts


def test_b_wins_on_human_opens_and_goes_to_the_remaining_80_percent(relay, api, shared_worker):
    eligible = make_audience(300)
    people = contacts_by_email()
    seed = 1234
    campaigns.create_campaign(
        "spring",
        template="news",
        lists=["news"],
        ab_test={
            "variants": [{"subject": SUBJECTS["A"]}, {"subject": SUBJECTS["B"], "from_name": "Ann at SmartMail"}],
            "test_share": 0.2,
            "metric": "opens",
            "duration": "2h",
            "seed": seed,
        },
    )
    shared_worker(queues="bulk,events,default")
    campaigns.launch_campaign("spring")
    wait_for(lambda: campaigns.get_campaign("spring")["fanned_out"], 30, message="the test fanned out")

    # The test share only, each contact on the variant its seeded place says; nothing for the rest.
    expected = {}
    for email in eligible:
        index = ab_tests.place(seed, people[email][0], 0.2, 2)
        if index is not None:
            expected[email] = "AB"[index]
    assert {r.recipient: r.variant for r in campaign_rows("spring")} == expected
    assert 30 <= len(expected) <= 90  # 20% of 300, within sampling noise
    counts = collections.Counter(expected.values())
    assert abs(counts["A"] - counts["B"]) <= 25
    settled(relay, len(expected))
    mail = delivered(relay)
    assert set(mail) == set(expected)
    for email, variant in expected.items():
        [message] = mail[email]
        first_name = people[email][1]["first_name"]
        assert message["Subject"] == SUBJECTS[variant].replace("{{ first_name }}", first_name)
        assert message["X-SmartMail-Variant"] == variant
        assert message["From"].addresses[0].addr_spec == "tests@example.com"
        assert message["From"].addresses[0].display_name == (
            "Ann at SmartMail" if variant == "B" else "SmartMail Tests"
        )
    campaigns.run_due()
    assert campaigns.get_campaign("spring")["state"] == "sending"  # every test message sent: it waits for its winner

    # Opens through the tracking endpoint: every B message by a person (some twice), two A messages,
    # and A messages fetched by Gmail's image proxy, which are machine opens and do not count.
    person = httpx.Client(base_url=api.url, headers={"User-Agent": HUMAN})
    proxy = httpx.Client(base_url=api.url, headers={"User-Agent": PROXY})
    api.clients += [person, proxy]
    a_emails = sorted(e for e, v in expected.items() if v == "A")
    b_emails = sorted(e for e, v in expected.items() if v == "B")

    def pixel(email: str) -> str:
        html = mail[email][0].get_body(("html",)).get_content()
        return _PIXEL.findall(html)[0]

    hits = 0
    for i, email in enumerate(b_emails):
        for _ in range(2 if i % 3 == 0 else 1):
            assert person.get(pixel(email)).status_code == 200
            hits += 1
    for email in a_emails[:2]:
        assert person.get(pixel(email)).status_code == 200
        hits += 1
    for email in a_emails[2:6]:
        assert proxy.get(pixel(email)).status_code == 200
        hits += 1

    def opened() -> int:
        with session_scope() as session:
            return session.scalar(select(func.count()).where(Event.type == "opened")) or 0

    wait_for(lambda: opened() == hits, 30, message="the opens stored")

    # The test's duration passes on the scheduler's clock: an hour in, no winner; two hours in, B.
    campaigns.run_due(now=utcnow() + timedelta(hours=1))
    assert campaigns.get_campaign("spring")["ab_winner"] is None
    report = campaigns.ab_report("spring")
    assert report["leader"] == "B" and report["winner"] is None
    campaigns.run_due(now=utcnow() + timedelta(hours=2, minutes=1))
    assert campaigns.get_campaign("spring")["ab_winner"] == "B"

    # B goes to the remaining 80%: each of them once, B's subject and sender, no variant recorded.
    settled(relay, len(eligible))
    mail = delivered(relay)
    assert set(mail) == eligible and all(len(messages) == 1 for messages in mail.values())
    rest = eligible - set(expected)
    for email in rest:
        [message] = mail[email]
        assert message["Subject"] == f"{people[email][1]['first_name']}, our spring news"
        assert message["X-SmartMail-Variant"] == "B"
        assert message["From"].addresses[0].display_name == "Ann at SmartMail"
    rows = campaign_rows("spring")
    assert {r.recipient for r in rows if r.variant is None} == rest

    # The report's numbers are the recorded events', counted here from `messages` and `events`.
    report = campaigns.ab_report("spring")
    recorded = independent_counts("spring")
    assert recorded["B"]["opens"] == len(b_emails) and recorded["A"]["opens"] == 2
    by_name = {row["name"]: row for row in report["variants"]}
    for name in ("A", "B"):
        row = by_name[name]
        assert (row["sent"], row["opens"], row["clicks"]) == (
            recorded[name]["sent"],
            recorded[name]["opens"],
            recorded[name]["clicks"],
        )
        assert row["open_rate"] == round(recorded[name]["opens"] / recorded[name]["sent"], 4)
    assert report["winner"] == report["leader"] == "B" and report["metric"] == "opens"
    z, p = ab_tests.z_test(2, recorded["A"]["sent"], len(b_emails), recorded["B"]["sent"])
    assert by_name["A"]["p_value"] == round(p, 6) and by_name["A"]["significant"] is True
    assert by_name["A"]["verdict"].startswith("significantly below B")
    over_http = api.client("campaigns:read").get("/v1/campaigns/spring/ab-report")
    assert over_http.status_code == 200
    assert [(v["name"], v["sent"], v["opens"]) for v in over_http.json()["variants"]] == [
        (name, by_name[name]["sent"], by_name[name]["opens"]) for name in ("A", "B")
    ]
    wait_for(lambda: campaigns.run_due() or campaigns.get_campaign("spring")["state"] == "sent", 30)


def test_fan_out_records_the_split_holds_the_rest_and_the_operator_picks_the_winner(relay, monkeypatch):
    make_audience(200)
    people = contacts_by_email()
    later = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
    settings = {
        "variants": [
            {"name": "plain", "from_name": "Ann"},
            {"name": "later", "send_at": later.isoformat()},
            {"name": "long", "template": "news-long", "subject": "Long, {{ first_name }}"},
        ],
        "test_share": "50%",
        "metric": "conversions",
        "conversion_event": "order_placed",
        "conversion_hours": 24,
        "duration": 3600,
        "auto_winner": False,
        "seed": 77,
    }
    written = {}
    for name in ("copy", "insert"):
        if name == "insert":  # PostgreSQL fans out by COPY unless an address would need escaping
            monkeypatch.setattr(fan_out_sql, "COPY_SPECIAL", re.compile(""))
        campaigns.create_campaign(name, template="news", lists=["news"], ab_test=settings)
        with session_scope() as session:
            campaign = session.scalar(select(Campaign).where(Campaign.name == name))
            assert campaigns._start(session, campaign)
            campaign_id = campaign.id
            frozen = {v["name"]: v for v in campaign.ab_frozen}
            assert campaign.ab_decide_at == later + timedelta(seconds=3600)  # after the last variant's send time
        assert frozen["long"]["html"].startswith("<html><body><p>Long {{ plan }}")  # its own template, frozen
        assert frozen["long"]["subject"] == "Long, {{ first_name }}" and frozen["plain"]["subject"] == "News"
        assert frozen["plain"]["sender"] == "Ann <tests@example.com>"
        test_size = campaigns.fan_out(campaign_id)
        rows = campaign_rows(name)
        assert len(rows) == test_size and 70 <= test_size <= 130
        for row in rows:
            contact_id = people[row.recipient][0]
            assert row.variant == ("plain", "later", "long")[ab_tests.place(77, contact_id, 0.5, 3)]
            assert row.headers == {"X-SmartMail-Variant": row.variant}
            assert row.sender == frozen[row.variant]["sender"]
            assert (row.state, row.send_at) == (("scheduled", later) if row.variant == "later" else ("queued", None))
        written[name] = [tuple(r) for r in rows]
    assert written["copy"] == written["insert"]

    # Every test message sent: no winner picked automatically (auto_winner false), not marked sent.
    with session_scope() as session:
        session.execute(update(Message).values(state="sent", finished_at=utcnow()))
    campaigns.run_due(now=utcnow() + timedelta(days=1))
    assert campaigns.get_campaign("copy")["state"] == "sending" and campaigns.get_campaign("copy")["ab_winner"] is None

    # Conversions: the event within 24 hours of the message's first human click.
    with session_scope() as session:
        test_rows = session.execute(
            select(Message.id, Message.contact_id, Message.variant)
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(Campaign.name == "copy")
            .order_by(Message.contact_id)
        ).all()
    by_variant = collections.defaultdict(list)
    for row in test_rows:
        by_variant[row.variant].append(row)
    clicked_at = utcnow() - timedelta(days=2)
    firsts, events = [], []
    for i, row in enumerate(by_variant["plain"][:6]):
        firsts.append({"message_id": row.id, "link": 1, "machine": False, "occurred_at": clicked_at})
        hours = (2, 5, 23, 30, -1, 10)[i]  # 30 h is too late, -1 h before the click
        events.append(
            {"type": "order_placed", "contact_id": row.contact_id, "occurred_at": clicked_at + timedelta(hours=hours)}
        )
    scanned = by_variant["later"][0]  # a scanner's click then a purchase: no human click, no conversion
    firsts.append({"message_id": scanned.id, "link": 1, "machine": True, "occurred_at": clicked_at})
    events.append({"type": "order_placed", "contact_id": scanned.contact_id, "occurred_at": clicked_at})
    converted = by_variant["long"][0]
    firsts.append({"message_id": converted.id, "link": 2, "machine": False, "occurred_at": clicked_at})
    events.append(
        {"type": "order_placed", "contact_id": converted.contact_id, "occurred_at": clicked_at + timedelta(hours=1)}
    )
    with get_engine().begin() as connection:
        connection.execute(insert(EngagementFirst), firsts)
        connection.execute(insert(Event), [{**e, "properties": {}} for e in events])
    report = campaigns.ab_report("copy")
    by_name = {row["name"]: row for row in report["variants"]}
    assert [by_name[n]["conversions"] for n in ("plain", "later", "long")] == [4, 0, 1]
    assert [by_name[n]["clicks"] for n in ("plain", "later", "long")] == [6, 0, 1]
    assert [by_name[n]["sent"] for n in ("plain", "later", "long")] == [
        len(by_variant[n]) for n in ("plain", "later", "long")
    ]
    assert report["leader"] == "plain"
    assert not by_name["long"]["significant"] and "not significantly different from plain" in by_name["long"]["verdict"]
    assert not report["significant"] and "not significant" in report["conclusion"]

    # The operator picks: an unknown variant names the field; the winner goes to everyone left.
    from typer.testing import CliRunner

    from smartmail.cli.main import app as cli

    runner = CliRunner()
    result = runner.invoke(cli, ["campaign", "ab-winner", "copy", "--variant", "nope"])
    assert result.exit_code == 2 and "variant" in result.output
    table = runner.invoke(cli, ["campaign", "ab-report", "copy"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "not significantly different from plain" in table.output
    as_json = runner.invoke(cli, ["campaign", "ab-report", "copy", "--format", "json"])
    assert as_json.exit_code == 0 and '"conversions": 4' in as_json.output
    result = runner.invoke(cli, ["campaign", "ab-winner", "copy", "--variant", "long"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["campaign", "ab-winner", "copy"]).exit_code == 2  # it has its winner
    copy_id = campaigns.get_campaign("copy")["id"]
    assert campaigns.fan_out(copy_id) == 200 - len(test_rows)
    rest = [r for r in campaign_rows("copy") if r.variant is None]
    assert len(rest) == 200 - len(test_rows) and len(campaign_rows("copy")) == 200
    assert all(
        r.headers == {"X-SmartMail-Variant": "long"} and r.sender == "SmartMail Tests <tests@example.com>" for r in rest
    )
    assert campaigns.fan_out(copy_id) == 0  # fanned out: a relaunch adds nothing

    # Beat picks a winner once the test is over when auto_winner is on; no conversion anywhere: a
    # tie, which goes to the earliest variant.
    with session_scope() as session:
        other = session.scalar(select(Campaign).where(Campaign.name == "insert"))
        other.ab_test = {**other.ab_test, "auto_winner": True}
    campaigns.run_due(now=later + timedelta(minutes=59))
    assert campaigns.get_campaign("insert")["ab_winner"] is None  # the test runs an hour after `later`
    campaigns.run_due(now=later + timedelta(minutes=61))
    assert campaigns.get_campaign("insert")["ab_winner"] == "plain"


def test_bad_ab_tests_name_the_field_over_every_entry_point(relay, api):
    make_audience(3)
    bad = {"variants": [{"subject": "A"}, {"template": "missing"}], "test_share": 0.2, "duration": "4h"}
    with pytest.raises(campaigns.InvalidInput) as caught:
        campaigns.create_campaign("c1", template="news", lists=["news"], ab_test=bad)
    assert caught.value.field == "ab_test.variants[1].template"
    client = api.client("campaigns:write", "campaigns:read")
    body = {"name": "c1", "template": "news", "lists": ["news"], "ab_test": bad}
    response = client.post("/v1/campaigns", json=body)
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/ab_test/variants/1/template"
    unknown = client.post("/v1/campaigns", json={**body, "ab_test": {**bad, "colour": 1}})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["pointer"] == "/ab_test/colour"
    good = {**bad, "variants": [{"subject": "A"}, {"subject": "B"}], "seed": 5}
    created = client.post("/v1/campaigns", json={**body, "ab_test": good})
    assert created.status_code == 201, created.json()
    assert created.json()["ab_test"]["seed"] == 5 and created.json()["ab_test"]["duration"] == 14400
    assert client.get("/v1/campaigns/c1/ab-report").json()["leader"] == "A"  # nothing sent: the earliest
    not_yet = client.post("/v1/campaigns/c1/ab-winner", json={"variant": "B"})
    assert not_yet.status_code == 409  # a draft: the winner is picked once it has launched
    removed = client.patch("/v1/campaigns/c1", json={"ab_test": None})
    assert removed.status_code == 200 and removed.json()["ab_test"] is None
    assert client.get("/v1/campaigns/c1/ab-report").status_code == 422

    from typer.testing import CliRunner

    from smartmail.cli.main import app as cli

    runner = CliRunner()
    result = runner.invoke(
        cli, ["campaign", "ab-test", "c1", '{"variants": [{}, {}], "test_share": 2, "duration": 60}']
    )
    assert result.exit_code == 2 and "ab_test.test_share" in result.output
    result = runner.invoke(cli, ["campaign", "ab-test", "c1", "{not json"])
    assert result.exit_code == 2 and "ab_test" in result.output


def test_the_automatic_winner_waits_until_the_test_emails_went_and_the_duration_passed(relay):
    make_audience(60)
    settings = {"variants": [{"subject": "One"}, {"subject": "Two"}], "test_share": 0.5, "duration": 3600}
    campaigns.create_campaign("held", template="news", lists=["news"], ab_test=settings)
    with session_scope() as session:
        campaign = session.scalar(select(Campaign).where(Campaign.name == "held"))
        assert campaigns._start(session, campaign)
        campaign_id = campaign.id
    assert campaigns.fan_out(campaign_id) > 0
    # Two hours on, but the test emails are still queued (a closed window, a throttled site): no winner.
    campaigns.run_due(now=utcnow() + timedelta(hours=2))
    assert campaigns.get_campaign("held")["ab_winner"] is None
    sent_at = utcnow() + timedelta(hours=2)
    with session_scope() as session:
        session.execute(update(Message).values(state="sent", finished_at=sent_at))
    campaigns.run_due(now=sent_at + timedelta(minutes=30))  # sent, but the test ran only 30 minutes
    assert campaigns.get_campaign("held")["ab_winner"] is None
    campaigns.run_due(now=sent_at + timedelta(hours=1, minutes=1))
    assert campaigns.get_campaign("held")["ab_winner"] == "A"  # no opens: a tie, the earliest variant
