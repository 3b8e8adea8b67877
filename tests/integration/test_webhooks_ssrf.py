"""The webhook SSRF guard: forbidden URLs refused at save time, names rebound to forbidden addresses at send time."""

from __future__ import annotations

import ipaddress

import pytest
import trustme
from sqlalchemy import func, select

from smartmail.audience.contacts import track
from smartmail.errors import InvalidInput
from smartmail.store.engine import get_engine
from smartmail.store.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from smartmail.webhooks import drain, endpoints, fan_out
from tests.conftest import reset_caches, wait_for
from tests.dns_server import DnsServer
from tests.webhook_receiver import WebhookReceiver, write_authority

pytestmark = pytest.mark.integration

PUBLIC = "93.184.215.14"  # never reached: the name is rebound before anything is sent


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hooks",
        "https://10.0.0.1/hooks",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:127.0.0.1]/hooks",
    ],
)
def test_a_url_whose_host_is_a_forbidden_address_is_refused_at_save_time(env, url):
    with pytest.raises(InvalidInput) as refused:
        endpoints.create_endpoint(url)
    assert refused.value.field == "url"
    with get_engine().connect() as connection:
        assert connection.scalar(select(func.count()).select_from(WebhookEndpoint)) == 0


@pytest.fixture
def rebinding(env, monkeypatch, tmp_path):
    """A DNS server the workers resolve with, answering a public address for hook.test; the guard is
    live (no SMARTMAIL_WEBHOOK_ALLOW_NETWORKS), and a receiver listens on 127.0.0.1."""
    authority = trustme.CA()
    with DnsServer({"hook.test": [PUBLIC]}) as dns, WebhookReceiver(authority) as receiver:
        monkeypatch.setenv("SMARTMAIL_WEBHOOK_NAMESERVERS", f'["{dns.address}"]')
        monkeypatch.setenv("SMARTMAIL_WEBHOOK_CA_FILE", str(write_authority(authority, tmp_path)))
        monkeypatch.delenv("SMARTMAIL_WEBHOOK_ALLOW_NETWORKS", raising=False)
        reset_caches()
        yield dns, receiver


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("::ffff:127.0.0.1", "loopback"),
    ],
)
def test_a_name_rebound_to_a_forbidden_address_is_refused_at_send_time_and_nothing_is_sent(rebinding, address, reason):
    dns, receiver = rebinding
    endpoint, _ = endpoints.create_endpoint(f"https://hook.test:{receiver.port}/hooks")  # saved: a name
    dns.answers["hook.test"] = [address]
    track("someone@example.com", "signup")

    # What the beat tick and the webhooks task do, in this process (the tick polls: on PostgreSQL an
    # event is readable once every transaction older than it has ended).
    assert wait_for(lambda: fan_out.fan_out().deliveries, 10, message="the event fanned out") == 1
    assert drain.drain(endpoint["id"]) is False

    with get_engine().connect() as connection:
        attempts = connection.execute(select(WebhookAttempt.status, WebhookAttempt.error)).all()
        delivery = connection.execute(select(WebhookDelivery.state, WebhookDelivery.attempts)).one()
    assert [(status, error) for status, error in attempts] == [
        (None, f"refused by the SSRF guard: hook.test resolves to {ipaddress.ip_address(address)} ({reason})")
    ]
    assert tuple(delivery) == ("pending", 1)  # retried on the schedule, refused again each time
    assert ("hook.test", "A") in dns.queries  # resolved when sending, not from what was saved
    assert receiver.count == 0
