"""Amazon SNS message signatures: the signing certificate's URL and cache, the string to sign, RSA versions 1 and 2."""

from __future__ import annotations

import base64
import binascii
import collections
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from smartmail import runtime
from smartmail.config import get_settings

log = structlog.get_logger("smartmail.feedback")

# The fields signed, in this order, per message Type, each as "Name\nValue\n" (AWS SNS developer guide,
# "Verifying the signatures of Amazon SNS messages"). A Notification's Subject only when it has one.
SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
OPTIONAL_FIELDS = frozenset({"Subject"})
# SignatureVersion 1: RSA PKCS#1 v1.5 over SHA1; version 2 (the topic's SignatureVersion attribute): SHA256.
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
# SNS's regional endpoints, `sns.<region>.amazonaws.com` (`.com.cn` in China; AWS General Reference,
# "Amazon SNS endpoints"): a region, not any label, so no S3 bucket, website or API Gateway host
# (`sns.s3.amazonaws.com`, `sns.execute-api.…`) that anyone can publish files on passes.
SNS_HOST = re.compile(r"sns\.[a-z]{2}(?:-gov)?-[a-z]+-\d\.amazonaws\.com(?:\.cn)?")
# The signing certificates' paths there: `/SimpleNotificationService-<hash>.pem` (the developer guide's
# "Verifying the signatures of Amazon SNS messages", as the AWS SDKs' message validators check them).
CERTIFICATE_PATH = re.compile(r"/SimpleNotificationService-[^/]*\.pem")
MAX_FUTURE = timedelta(minutes=5)  # clock skew tolerated for a Timestamp ahead of ours
MAX_CERTIFICATE_BYTES = 16 * 1024  # an SNS certificate is under 2 KB
MAX_CERTIFICATES = 16  # cached per process; SNS rotates its certificate a few times a year
FETCH_TIMEOUT = 5.0


class Refused(Exception):
    """A message SNS did not sign, or not for us; `reason` says which check failed (never the message's content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unavailable(Exception):
    """The signing certificate or the subscription URL did not answer: worth a retry by SNS (a 5xx)."""


def allowed_url(url: object, *, what: str, pem: bool = False) -> str:
    """`url` when it is on an SNS regional host over https (and, for a certificate, SNS's certificate
    path), or within SMARTMAIL_SNS_TEST_CERTIFICATE_PREFIX (tests only); else Refused. The only URLs
    we fetch from a message, so a forged one cannot point us anywhere else (SSRF)."""
    if not isinstance(url, str) or not url.isprintable() or " " in url:
        raise Refused(f"{what} is not a URL")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        raise Refused(f"{what} is not a URL") from None
    prefix = get_settings().sns_test_certificate_prefix
    if prefix and _within(parts, port, urlsplit(prefix)):
        return url
    if parts.scheme != "https":
        raise Refused(f"{what} is not https")
    # netloc == host: no user-info, no port, nothing a parser could read another way.
    if parts.netloc.lower() != host or not SNS_HOST.fullmatch(host):
        raise Refused(f"{what} is not on an Amazon SNS host")
    if pem and (parts.query or parts.fragment or not CERTIFICATE_PATH.fullmatch(parts.path)):
        raise Refused(f"{what} is not an SNS signing certificate (/SimpleNotificationService-….pem)")
    return url


def _within(parts: SplitResult, port: int | None, prefix: SplitResult) -> bool:
    """Whether a URL is under the test prefix: the same scheme, host and port, compared parsed (a
    string prefix `http://127.0.0.1:8000` would also take `http://127.0.0.1:8000.evil/`), no user-info,
    and a path that starts with the prefix's."""
    try:
        prefix_port = prefix.port
    except ValueError:
        return False
    return (
        parts.scheme == prefix.scheme
        and parts.username is None
        and (parts.hostname or "") == (prefix.hostname or "")
        and port == prefix_port
        and parts.path.startswith(prefix.path)
    )


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signed: the Type's fields, each as "Name\\nValue\\n"; Refused when one is missing."""
    fields = SIGNED_FIELDS.get(message.get("Type"))  # type: ignore[arg-type]
    if fields is None:
        raise Refused("Type is not Notification, SubscriptionConfirmation or UnsubscribeConfirmation")
    lines = []
    for name in fields:
        value = message.get(name)
        if value is None and name in OPTIONAL_FIELDS:
            continue
        if not isinstance(value, str):
            raise Refused(f"{name} is missing")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode()


def _timestamp(message: Mapping[str, Any], now: datetime) -> None:
    value = message.get("Timestamp")
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise Refused("Timestamp is missing or not an ISO 8601 time with a zone")
    if now - at > timedelta(seconds=get_settings().sns_max_age_seconds):
        raise Refused("Timestamp is too old (a replay?)")
    if at - now > MAX_FUTURE:
        raise Refused("Timestamp is in the future")


def verify(
    message: Mapping[str, Any],
    *,
    now: datetime | None = None,
    certificate: Callable[[str], x509.Certificate] | None = None,
) -> None:
    """Return when `message` (a parsed SNS POST body) is signed by SNS for one of SMARTMAIL_SES_TOPIC_ARNS
    and recent; else raise Refused (or Unavailable when the certificate cannot be fetched).
    The cheap checks come first: nothing is fetched for a message that fails them."""
    now = now or datetime.now(UTC)
    data = string_to_sign(message)
    if message["TopicArn"] not in get_settings().ses_topic_arns:
        raise Refused("TopicArn is not one of SMARTMAIL_SES_TOPIC_ARNS")
    _timestamp(message, now)
    version = message.get("SignatureVersion")
    algorithm = HASHES.get(version) if isinstance(version, str) else None
    if algorithm is None:
        raise Refused("SignatureVersion is not 1 or 2")
    encoded = message.get("Signature")
    if not isinstance(encoded, str) or not encoded:
        raise Refused("Signature is missing")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("Signature is not base64") from None
    url = allowed_url(message.get("SigningCertURL"), what="SigningCertURL", pem=True)
    signer = (certificate or signing_certificate)(url)
    if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
        raise Refused("the signing certificate has expired or is not valid yet")
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise Refused("the signing certificate's key is not RSA")
    try:
        key.verify(signature, data, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        raise Refused("the signature does not match") from None


# --- Fetching: the certificate, the subscription URL ---------------------------------------------------


@runtime.per_process(close=lambda client, close: client.close() if close else None)
def http() -> httpx.Client:
    """The process's client for SNS URLs: a short timeout; redirects not followed (their targets are unchecked)."""
    return httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False)


def fetch(url: str, *, what: str, limit: int = MAX_CERTIFICATE_BYTES) -> bytes:
    """GET `url` (already checked by allowed_url): the body of a 200, read to at most `limit` bytes.
    Errors name `what`, not the URL: a SubscribeURL holds the subscription's token."""
    try:
        with http().stream("GET", url) as response:
            if response.status_code != 200:
                raise Unavailable(f"{what} answered {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise Refused(f"{what} is larger than {limit} bytes")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{what}: {type(exc).__name__}") from None


class CertificateCache:
    """The signing certificates fetched, by URL: the most recently used few, loaded once."""

    def __init__(self, size: int = MAX_CERTIFICATES) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.entries: collections.OrderedDict[str, x509.Certificate] = collections.OrderedDict()

    def get(self, url: str) -> x509.Certificate:
        with self.lock:
            if url in self.entries:
                self.entries.move_to_end(url)
                return self.entries[url]
        pem = fetch(url, what="SigningCertURL")
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Refused("SigningCertURL does not hold a PEM certificate") from None
        with self.lock:
            self.entries[url] = certificate
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        log.info("sns.certificate_fetched", url=url)
        return certificate


@runtime.per_process()
def certificates() -> CertificateCache:
    return CertificateCache()


def signing_certificate(url: str) -> x509.Certificate:
    """The certificate at `url` (checked by allowed_url), from this process's cache or fetched."""
    return certificates().get(url)


def confirm_subscription(message: Mapping[str, Any]) -> None:
    """Visit a verified SubscriptionConfirmation's SubscribeURL, as SNS asks (the response is not needed)."""
    url = allowed_url(message.get("SubscribeURL"), what="SubscribeURL")
    fetch(url, what="SubscribeURL", limit=64 * 1024)
