"""SNS signature verification: a throwaway key and certificate sign messages as SNS does (versions 1 and 2)."""

from __future__ import annotations

import base64
import copy
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.feedback import sns

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem"
NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def make_certificate(key: rsa.RSAPrivateKey, *, days: int = 30, start: datetime = NOW) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - timedelta(days=1))
        .not_valid_after(start + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def certificate(key) -> x509.Certificate:
    return make_certificate(key)


@pytest.fixture(autouse=True)
def env(settings_env):
    settings_env.setenv("SMARTMAIL_SES_TOPIC_ARNS", f'["{TOPIC}"]')
    runtime.reset()
    return settings_env


class Certificates:
    """The certificate getter verify() is given: records the URLs asked for."""

    def __init__(self, certificate: x509.Certificate) -> None:
        self.certificate = certificate
        self.asked: list[str] = []

    def __call__(self, url: str) -> x509.Certificate:
        self.asked.append(url)
        return self.certificate


@pytest.fixture
def certificates(certificate) -> Certificates:
    return Certificates(certificate)


def sign(message: dict, key: rsa.RSAPrivateKey, version: str = "1") -> dict:
    """Sign as SNS does, written out from the AWS guide: "Name\\nValue\\n" for the Type's fields in order."""
    if message["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    text = "".join(f"{name}\n{message[name]}\n" for name in names if name in message)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = key.sign(text.encode(), padding.PKCS1v15(), algorithm)
    return {**message, "SignatureVersion": version, "Signature": base64.b64encode(signature).decode()}


def notification(**fields) -> dict:
    message = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Message": '{"notificationType":"Delivery","mail":{"messageId":"0100abc"}}',
        "Timestamp": (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    }
    message.update(fields)
    return {name: value for name, value in message.items() if value is not None}


def confirmation(**fields) -> dict:
    message = notification(
        Type="SubscriptionConfirmation",
        Token="2336412f37fb687f5d51e6e2425f004aed",
        Message=f"You have chosen to subscribe to the topic {TOPIC}.",
        SubscribeURL=f"https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336",
        UnsubscribeURL=None,
    )
    message.update(fields)
    return message


def refused(message: dict, certificates, *, now: datetime = NOW) -> str:
    with pytest.raises(sns.Refused) as caught:
        sns.verify(message, now=now, certificate=certificates)
    return caught.value.reason


# --- Accepted ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("subject", [None, "Amazon SES Email Event Notification"])
def test_a_signed_notification_is_accepted(key, certificates, version, subject):
    sns.verify(sign(notification(Subject=subject), key, version), now=NOW, certificate=certificates)
    assert certificates.asked == [CERT_URL]


@pytest.mark.parametrize("kind", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
def test_signed_subscription_messages_are_accepted(key, certificates, kind):
    sns.verify(sign(confirmation(Type=kind), key, "2"), now=NOW, certificate=certificates)


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.ap-southeast-2.amazonaws.com/SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem",
    ],
)
def test_china_and_govcloud_regions_are_sns_hosts(key, certificates, url):
    sns.verify(sign(notification(SigningCertURL=url), key), now=NOW, certificate=certificates)


# --- Refused -----------------------------------------------------------------------------------------


def test_a_tampered_message_is_refused(key, certificates):
    message = sign(notification(), key)
    message["Message"] = message["Message"].replace("Delivery", "Bounce")
    assert refused(message, certificates) == "the signature does not match"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("Subject", "added after signing"),
        ("MessageId", "another-id"),
        ("Timestamp", "2026-12-04T11:59:31.000Z"),
        ("TopicArn", "arn:aws:sns:us-east-1:123456789012:other"),
    ],
)
def test_a_signed_field_changed_or_added_is_refused(key, certificates, env, field, value):
    env.setenv("SMARTMAIL_SES_TOPIC_ARNS", f'["{TOPIC}", "arn:aws:sns:us-east-1:123456789012:other"]')
    get_settings.forget()
    message = sign(notification(), key)
    message[field] = value
    assert refused(message, certificates) == "the signature does not match"


def test_a_signature_of_another_key_is_refused(key, certificates):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(sign(notification(), other), certificates) == "the signature does not match"


def test_a_version_1_signature_claimed_as_version_2_is_refused(key, certificates):
    message = sign(notification(), key, "1")
    message["SignatureVersion"] = "2"
    assert refused(message, certificates) == "the signature does not match"


@pytest.mark.parametrize("signature", [None, "", "not base64!"])
def test_an_unsigned_message_is_refused(key, certificates, signature):
    message = sign(notification(), key)
    del message["Signature"]
    if signature is not None:
        message["Signature"] = signature
    assert refused(message, certificates) in ("Signature is missing", "Signature is not base64")
    assert certificates.asked == []


@pytest.mark.parametrize("version", ["3", "0", "", None, 1])
def test_unknown_signature_versions_are_refused(key, certificates, version):
    message = sign(notification(), key)
    message["SignatureVersion"] = version
    assert refused(message, certificates) == "SignatureVersion is not 1 or 2"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://sns.us-east-1.amazonaws.com.evil.com/cert.pem", "SigningCertURL is not on an Amazon SNS host"),
        ("http://sns.us-east-1.amazonaws.com/cert.pem", "SigningCertURL is not https"),
        ("https://evil.com/sns.us-east-1.amazonaws.com/cert.pem", "SigningCertURL is not on an Amazon SNS host"),
        ("https://sns.us-east-1.amazonaws.com@evil.com/cert.pem", "SigningCertURL is not on an Amazon SNS host"),
        ("https://evil.com#@sns.us-east-1.amazonaws.com/cert.pem", "SigningCertURL is not on an Amazon SNS host"),
        ("https://sns.us-east-1.amazonaws.com:8443/cert.pem", "SigningCertURL is not on an Amazon SNS host"),
        ("https://s3.us-east-1.amazonaws.com/cert.pem", "SigningCertURL is not on an Amazon SNS host"),
        (
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.txt",
            "SigningCertURL is not an SNS signing certificate (/SimpleNotificationService-….pem)",
        ),
        # Hosts where anyone can publish a file: S3 buckets and websites, API Gateway, not a region.
        (
            "https://sns.s3.amazonaws.com/SimpleNotificationService-abc.pem",
            "SigningCertURL is not on an Amazon SNS host",
        ),
        (
            "https://sns.s3-website-us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "SigningCertURL is not on an Amazon SNS host",
        ),
        (
            "https://sns.execute-api.amazonaws.com/SimpleNotificationService-abc.pem",
            "SigningCertURL is not on an Amazon SNS host",
        ),
        ("https://sns.s3.us-east-1.amazonaws.com/x.pem", "SigningCertURL is not on an Amazon SNS host"),
        (
            "https://sns.us-east-1.amazonaws.com/cert.pem",
            "SigningCertURL is not an SNS signing certificate (/SimpleNotificationService-….pem)",
        ),
        (
            "https://sns.us-east-1.amazonaws.com/bucket/SimpleNotificationService-abc.pem",
            "SigningCertURL is not an SNS signing certificate (/SimpleNotificationService-….pem)",
        ),
        (
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a/b.pem",
            "SigningCertURL is not an SNS signing certificate (/SimpleNotificationService-….pem)",
        ),
        (
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem?x=.pem",
            "SigningCertURL is not an SNS signing certificate (/SimpleNotificationService-….pem)",
        ),
        ("https://sns.us-east-1.amazonaws.com/a.pem\n", "SigningCertURL is not a URL"),
        ("file:///etc/ssl/cert.pem", "SigningCertURL is not https"),
    ],
)
def test_a_certificate_off_the_sns_hosts_is_refused_unfetched(key, certificates, url, reason):
    assert refused(sign(notification(SigningCertURL=url), key), certificates) == reason
    assert certificates.asked == []


def test_a_missing_certificate_url_is_refused(key, certificates):
    assert refused(sign(notification(SigningCertURL=None), key), certificates) == "SigningCertURL is not a URL"


def test_a_stale_message_is_refused(key, certificates):
    message = sign(notification(Timestamp="2026-12-04T10:59:00.000Z"), key)
    assert refused(message, certificates) == "Timestamp is too old (a replay?)"
    assert certificates.asked == []


def test_the_age_limit_is_a_setting(key, certificates, env):
    env.setenv("SMARTMAIL_SNS_MAX_AGE_SECONDS", "10")
    get_settings.forget()
    assert refused(sign(notification(), key), certificates) == "Timestamp is too old (a replay?)"


def test_a_message_from_the_future_is_refused(key, certificates):
    message = sign(notification(Timestamp="2026-12-04T12:06:00.000Z"), key)
    assert refused(message, certificates) == "Timestamp is in the future"
    sns.verify(sign(notification(Timestamp="2026-12-04T12:04:00.000Z"), key), now=NOW, certificate=certificates)


@pytest.mark.parametrize("timestamp", ["yesterday", "2026-12-04T11:59:00", ""])
def test_a_timestamp_without_a_zone_is_refused(key, certificates, timestamp):
    message = sign(notification(Timestamp=timestamp), key)
    assert refused(message, certificates) == "Timestamp is missing or not an ISO 8601 time with a zone"


def test_a_topic_not_allowed_is_refused(key, certificates):
    message = sign(notification(TopicArn="arn:aws:sns:us-east-1:999999999999:someone-else"), key)
    assert refused(message, certificates) == "TopicArn is not one of SMARTMAIL_SES_TOPIC_ARNS"
    assert certificates.asked == []


@pytest.mark.parametrize("field", ["Message", "MessageId", "Timestamp", "TopicArn"])
def test_a_missing_field_is_refused(key, certificates, field):
    message = sign(notification(), key)
    del message[field]
    assert refused(message, certificates) == f"{field} is missing"


@pytest.mark.parametrize("field", ["SubscribeURL", "Token"])
def test_a_confirmation_missing_a_field_is_refused(key, certificates, field):
    message = sign(confirmation(), key)
    del message[field]
    assert refused(message, certificates) == f"{field} is missing"


@pytest.mark.parametrize("kind", [None, "Bounce", "notification"])
def test_an_unknown_type_is_refused(key, certificates, kind):
    message = sign(notification(), key)
    message["Type"] = kind
    assert refused(message, certificates).startswith("Type is not")


def test_an_expired_certificate_is_refused(key):
    old = Certificates(make_certificate(key, days=1, start=NOW - timedelta(days=30)))
    reason = refused(sign(notification(), key), old)
    assert reason == "the signing certificate has expired or is not valid yet"


def test_the_test_prefix_allows_a_local_certificate_only_when_set(key, certificates, env):
    url = "http://127.0.0.1:8123/cert.pem"
    message = sign(notification(SigningCertURL=url), key)
    assert refused(message, certificates) == "SigningCertURL is not https"
    env.setenv("SMARTMAIL_SNS_TEST_CERTIFICATE_PREFIX", "http://127.0.0.1:8123/")
    get_settings.forget()
    sns.verify(message, now=NOW, certificate=certificates)
    assert certificates.asked == [url]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8123.evil.example/cert.pem",
        "http://127.0.0.1:81234/cert.pem",
        "http://127.0.0.1:8123@evil.example/cert.pem",
        "http://user@127.0.0.1:8123/cert.pem",
        "https://127.0.0.1:8123/certs/cert.pem",
        "http://127.0.0.2:8123/certs/cert.pem",
        "http://127.0.0.1:8124/certs/cert.pem",
        "http://127.0.0.1:8123/other/cert.pem",
        "http://127.0.0.1/certs/cert.pem",
    ],
)
def test_the_test_prefix_is_compared_as_a_url_not_as_a_string(key, certificates, env, url):
    env.setenv("SMARTMAIL_SNS_TEST_CERTIFICATE_PREFIX", "http://127.0.0.1:8123/certs/")
    get_settings.forget()
    assert refused(sign(notification(SigningCertURL=url), key), certificates) is not None
    assert certificates.asked == []


# --- Fetching and caching the certificate --------------------------------------------------------


class FakeSns:
    """An httpx transport standing in for SNS's certificate host: answers from `pages`, counts requests."""

    def __init__(self, pages: dict[str, httpx.Response]) -> None:
        self.pages = pages
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        return self.pages.get(str(request.url), httpx.Response(404))


@pytest.fixture
def fake_sns(certificate):
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    fake = FakeSns({CERT_URL: httpx.Response(200, content=pem)})
    sns.http.replace(httpx.Client(transport=httpx.MockTransport(fake), follow_redirects=False))
    return fake


def test_the_certificate_is_fetched_once_per_process(key, fake_sns):
    for version in ("1", "2", "1"):
        sns.verify(sign(notification(), key, version), now=NOW)
    assert fake_sns.requests == [CERT_URL]
    runtime.reset()
    sns.http.replace(httpx.Client(transport=httpx.MockTransport(fake_sns)))
    sns.verify(sign(notification(), key), now=NOW)
    assert fake_sns.requests == [CERT_URL, CERT_URL]


def test_the_cache_is_bounded(certificate, fake_sns):
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    cache = sns.CertificateCache(size=2)
    urls = [f"https://sns.eu-west-{n}.amazonaws.com/c.pem" for n in range(3)]
    for url in urls:
        fake_sns.pages[url] = httpx.Response(200, content=pem)
        cache.get(url)
    assert list(cache.entries) == urls[1:]


def test_a_certificate_fetch_that_fails_is_unavailable_and_not_cached(key, certificate, fake_sns):
    fake_sns.pages[CERT_URL] = httpx.Response(503)
    with pytest.raises(sns.Unavailable, match="SigningCertURL answered 503"):
        sns.verify(sign(notification(), key), now=NOW)
    fake_sns.pages[CERT_URL] = httpx.Response(200, content=certificate.public_bytes(serialization.Encoding.PEM))
    sns.verify(sign(notification(), key), now=NOW)


def test_a_redirect_is_not_followed(key, fake_sns):
    fake_sns.pages[CERT_URL] = httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    with pytest.raises(sns.Unavailable, match="answered 302"):
        sns.verify(sign(notification(), key), now=NOW)
    assert fake_sns.requests == [CERT_URL]


def test_an_oversized_or_garbled_certificate_is_refused(key, fake_sns):
    fake_sns.pages[CERT_URL] = httpx.Response(200, content=b"-" * (sns.MAX_CERTIFICATE_BYTES + 1))
    reason = refused(sign(notification(), key), None)
    assert reason == f"SigningCertURL is larger than {sns.MAX_CERTIFICATE_BYTES} bytes"
    fake_sns.pages[CERT_URL] = httpx.Response(200, content=b"not a certificate")
    assert refused(sign(notification(), key), None) == "SigningCertURL does not hold a PEM certificate"


def test_a_subscription_is_confirmed_by_visiting_its_url(fake_sns):
    message = confirmation()
    fake_sns.pages[message["SubscribeURL"]] = httpx.Response(200, content=b"<ConfirmSubscriptionResponse/>")
    sns.confirm_subscription(message)
    assert fake_sns.requests == [message["SubscribeURL"]]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://sns.us-east-1.amazonaws.com.evil.com/?Action=x",
        "https://sns.s3.amazonaws.com/?Action=ConfirmSubscription&Token=2336",
        "https://sns.s3-website-us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=2336",
        "https://sns.execute-api.amazonaws.com/?Action=ConfirmSubscription&Token=2336",
    ],
)
def test_a_subscribe_url_off_the_sns_hosts_is_never_visited(fake_sns, url):
    with pytest.raises(sns.Refused, match="SubscribeURL is not"):
        sns.confirm_subscription(confirmation(SubscribeURL=url))
    assert fake_sns.requests == []


def test_the_reasons_never_hold_the_subscribe_token(fake_sns):
    message = confirmation()
    fake_sns.pages[message["SubscribeURL"]] = httpx.Response(500)
    with pytest.raises(sns.Unavailable) as caught:
        sns.confirm_subscription(message)
    assert "2336" not in str(caught.value)


def test_messages_are_not_altered(key, certificates):
    message = sign(notification(), key)
    before = copy.deepcopy(message)
    sns.verify(message, now=NOW, certificate=certificates)
    assert message == before
