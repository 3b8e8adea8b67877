"""Settings read from SMARTMAIL_* environment variables, validated once at start-up."""

from __future__ import annotations

import ipaddress
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from smartmail import runtime
from smartmail.addresses import AddressError, parse_mailbox
from smartmail.errors import SettingsError
from smartmail.logs import configure_for_library

TlsMode = Literal["none", "starttls", "ssl"]


@dataclass(frozen=True)
class SmtpUrl:
    """An SMTP relay parsed from `smtp://user:pass@host:port?tls=starttls|ssl|none`."""

    host: str
    port: int
    tls: TlsMode
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SmtpUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError(f"scheme must be smtp:// or smtps://, got {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise ValueError("a host is required, e.g. smtp://relay.example.com:587")
        query = parse_qs(parts.query)
        unknown = set(query) - {"tls"}
        if unknown:
            raise ValueError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
        tls = query.get("tls", ["ssl" if parts.scheme == "smtps" else "none"])[0]
        if tls not in ("none", "starttls", "ssl"):
            raise ValueError(f"tls must be none, starttls or ssl, got {tls!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        if port == 0:
            raise ValueError("bad port: must be 1-65535")
        default_port = {"none": 25, "starttls": 587, "ssl": 465}[tls]
        return cls(
            host=parts.hostname,
            port=port if port is not None else default_port,
            tls=tls,  # type: ignore[arg-type]
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def parse_nameserver(value: str) -> tuple[str, int]:
    """`1.2.3.4`, `127.0.0.1:5353`, `::1` or `[::1]:53` as (address, port); ValueError otherwise."""
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest else port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"{value!r} is not a nameserver (an IP address, optionally with a port: 127.0.0.1:5353)")
    return str(address), int(port)


class MetricsSettings(BaseSettings):
    """The settings of operator metrics (docs/metrics.md), apart: workers/metrics.py reads them when
    imported, before prometheus_client is, and must not fail there for want of the required ones."""

    model_config = SettingsConfigDict(env_prefix="SMARTMAIL_", extra="ignore")

    # prometheus_client's multiprocess directory; the web and worker processes of one installation share it.
    metrics_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "smartmail-metrics")
    metrics_token: str | None = Field(None, min_length=16)  # when set, /metrics asks for it as a bearer token


class Settings(MetricsSettings):
    """Every setting, with its SMARTMAIL_* variable; see the README's configuration reference."""

    model_config = SettingsConfigDict(env_prefix="SMARTMAIL_", extra="ignore")

    database_url: str = "sqlite:///smartmail.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    transport: Literal["smtp", "file", "console", "memory"] = "smtp"
    smtp_url: str = "smtp://127.0.0.1:8025?tls=none"
    smtp_timeout: float = Field(30.0, gt=0)
    smtp_max_messages_per_connection: int = Field(100, ge=1)
    smtp_local_hostname: str | None = None
    smtp_parallelism: int = Field(4, ge=1, le=100)  # concurrent SMTP transactions per worker process
    file_transport_dir: Path = Path("outbox")
    default_sender: str
    secret_key: str = Field(min_length=16)
    message_id_domain: str | None = None
    templates_dir: Path = Path("templates")
    template_cache_seconds: float = Field(2.0, ge=0)

    # Retry schedule for 4xx replies and connection errors (exponential backoff with jitter).
    retry_first_interval: float = Field(60.0, gt=0)
    retry_backoff_factor: float = Field(2.0, ge=1)
    retry_max_interval: float = Field(3600.0, gt=0)
    retry_jitter: float = Field(0.2, ge=0, le=1)
    retry_max_age: float = Field(3 * 86400.0, gt=0)

    # Beat cadence and the reconciler's thresholds.
    scheduler_interval: float = Field(5.0, gt=0)
    reconcile_interval: float = Field(60.0, gt=0)
    reconcile_queued_after: float = Field(600.0, gt=0)
    sending_timeout: float = Field(600.0, gt=0)
    # A worker process's claims are its own while it renews this lease (workers/ownership.py); once
    # it lapses, beat gives the claimed messages that were never transmitted to other workers.
    owner_lease: float = Field(10.0, ge=1)

    # Celery / Redis.
    broker_visibility_timeout: int = Field(3600, gt=0)
    redis_key_prefix: str = ""  # lets several SmartMail installations (or test runs) share one Redis
    batch_size: int = Field(100, ge=1, le=10000)
    # Drains are how worker processes share a backlog (tasks/send.py): at least the processes that
    # consume a stream's queue; more than those only wait their turn in the queue.
    dispatch_drains: int = Field(16, ge=1, le=1000)
    # send() pushes its ids to Redis from a background thread (producer/handoff.py), not in the call.
    dispatch_in_background: bool = True
    claim_window: int = Field(10, ge=1, le=1000)
    # Campaigns (the bulk stream) favour throughput: bigger batches and claim windows cost fewer
    # transactions per message, and a crash may leave more messages `unknown` (processes x window).
    bulk_batch_size: int = Field(500, ge=1, le=10000)
    bulk_claim_window: int = Field(50, ge=1, le=1000)
    fan_out_lease: float = Field(60.0, gt=0)  # seconds a campaign fan-out may go silent before beat restarts it
    import_writers: int = Field(
        3, ge=1, le=8
    )  # PostgreSQL connections an import writes batches on at once (the pool holds 10)

    # Traffic shaping (see policy.toml): off sends without rate, connection or rule checks.
    shaping: bool = True
    policy_file: Path | None = None  # default: the policy.toml shipped in smartmail/workers/
    policy_check_interval: float = Field(1.0, ge=0)
    smtp_idle_timeout: float = Field(5.0, gt=0)  # an idle pooled connection is closed after this

    # Links in messages (unsubscribe, click and open tracking) point at the web app here.
    public_url: str = "http://127.0.0.1:8000"
    unsubscribe_mailto: str | None = None  # default: unsubscribe@<the default sender's domain>

    # Open and click tracking, and the event stream (docs/events.md).
    track_transactional: bool = False  # transactional sends are tracked only when asked, by default
    track_honeypot: bool = False  # add a hidden link only machines follow: flags a scanner's clicks
    scanner_click_seconds: float = Field(10.0, ge=0)  # a click this soon after delivery is a scanner's
    scanner_burst_links: int = Field(3, ge=2)  # this many links of one message clicked within
    scanner_burst_seconds: float = Field(2.0, ge=0)  # … this many seconds: a scanner's
    tracking_ip_prefix_v4: int = Field(24, ge=0, le=32)  # IP addresses are stored truncated to these
    tracking_ip_prefix_v6: int = Field(48, ge=0, le=128)  # prefixes (32 / 128: whole addresses)
    tracking_buffer_max: int = Field(100_000, ge=100)  # events a web process holds while Redis is down
    tracking_stream_max: int = Field(1_000_000, ge=1000)  # events waiting in Redis for the events worker
    event_retention_days: int = Field(365, ge=1)  # events older than this are deleted by beat

    # Deliverability feedback (docs/deliverability.md): VERP return paths, the inbound SMTP server,
    # bounce and complaint effects, Amazon SES notifications, DKIM.
    bounce_domain: str | None = None  # envelope senders become <bounce_localpart>+<token>@this; off when unset
    bounce_localpart: str = Field("bounce", min_length=1, max_length=20, pattern=r"^[A-Za-z0-9._-]+$")
    inbound_host: str = "127.0.0.1"  # where `smartmail inbound` listens (0.0.0.0 on a public MX)
    inbound_port: int = Field(2525, ge=1, le=65535)
    inbound_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # larger mail is refused (552) before it is stored
    inbound_max_connections_per_ip: int = Field(20, ge=1)  # concurrent sessions from one client address
    inbound_rate_per_ip: float = Field(50.0, gt=0)  # messages/s one client address may deliver (burst: 2 s worth)
    inbound_tls_cert: Path | None = None  # STARTTLS is offered when a certificate and key are set
    inbound_tls_key: Path | None = None
    inbound_retention_days: int = Field(30, ge=1)  # processed inbound mail is deleted after this
    soft_bounce_limit: int = Field(3, ge=1)  # this many soft bounces of one contact …
    soft_bounce_days: float = Field(7.0, gt=0)  # … within this many days suppress the address
    auto_pause_min_delivered: int = Field(1000, ge=1)  # a campaign's rates are judged after this many delivered
    auto_pause_complaint_rate: float = Field(0.003, gt=0, le=1)  # complaints / delivered above this pauses it
    auto_pause_bounce_rate: float = Field(0.05, gt=0, le=1)  # hard bounces / delivered above this pauses it
    ses_topic_arns: list[str] = []  # SNS topics whose notifications /hooks/ses accepts; none: the hook is off
    sns_max_age_seconds: float = Field(3600.0, gt=0)  # older SNS messages are refused (replays)
    # Tests only: a certificate URL prefix accepted besides https://sns.<region>.amazonaws.com/.
    sns_test_certificate_prefix: str | None = None
    dkim_keys: Path | None = None  # a directory of DKIM private keys: <domain>/<selector>.pem (docs/deliverability.md)

    # Outbound webhooks (docs/webhooks.md).
    webhook_allow_http: bool = False  # http:// endpoint URLs, for development; https only otherwise
    webhook_allow_networks: list[str] = []  # private networks endpoints may resolve to (CIDRs); none by default
    # Off by default: httpcore leaves a timed-out HTTP/2 stream open (encode/httpcore#1022), so one
    # hanging request degrades the connection the endpoint's other requests share.
    webhook_http2: bool = False
    webhook_ca_file: Path | None = None  # trust endpoint certificates signed by these CAs (PEM) instead of the default
    webhook_nameservers: list[str] = []  # resolve endpoint hosts with these ("ip" or "ip:port"); default: the system's
    # Seconds to wait before each attempt: the first at once, then backoff (Svix's schedule); after
    # the last a delivery is `failed` (replayable).
    webhook_retry_schedule: list[float] = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    webhook_retry_jitter: float = Field(0.2, ge=0, le=1)
    webhook_connect_timeout: float = Field(5.0, gt=0)
    webhook_timeout: float = Field(15.0, gt=0)  # a whole request: connect, send, answer
    webhook_max_response_bytes: int = Field(64 * 1024, ge=0)  # an answer's body is read up to this, then dropped
    webhook_disable_after_days: float = Field(5.0, gt=0)  # an endpoint failing everything this long is disabled
    webhook_circuit_failures: int = Field(5, ge=1)  # consecutive failed requests that open an endpoint's circuit
    webhook_circuit_seconds: float = Field(30.0, gt=0)  # the first pause; doubled while it keeps failing, up to 10 min
    webhook_retention_days: int = Field(30, ge=1)  # finished deliveries and attempts are deleted after this
    webhook_poll_interval: float = Field(1.0, gt=0)  # beat's look at the event stream for new deliveries

    # Automations (docs/automations.md).
    automation_interval: float = Field(1.0, gt=0)  # beat's look for due enrolments and new trigger events
    automation_scan_interval: float = Field(60.0, gt=0)  # list joins, segment entries, dates, no-opens
    automation_batch_size: int = Field(500, ge=1, le=10000)  # enrolments advanced per transaction
    # Analytics (smartmail/analytics/): beat's look at the event stream for the roll-ups.
    analytics_interval: float = Field(30.0, gt=0)
    # Conversions: a contact's event of this type (a shop's `order_placed`) within this many days after
    # a human click converts the clicked message, once; its `amount` property adds to the revenue.
    # None: no conversions counted.
    analytics_conversion_event: str | None = Field(None, min_length=1, max_length=64)
    analytics_conversion_days: int = Field(7, ge=1, le=366)
    # The trends report e-mailed on a schedule (smartmail.analytics.send_report); no recipients: none sent.
    report_recipients: list[str] = []
    report_interval: float = Field(86400.0, ge=60)  # seconds between reports (one a day)
    # Marketing emails (campaigns and workflows; transactional mail exempt) per contact; 0: no cap.
    # A workflow step over the cap waits until the contact is under it again.
    frequency_cap_day: int = Field(0, ge=0)
    frequency_cap_week: int = Field(0, ge=0)
    # `adjustable`: the scheduler's clock can be moved forward (smartmail.automations.clock.advance),
    # for tests and rehearsals; `system` in production.
    scheduler_clock: Literal["system", "adjustable"] = "system"
    # The engagement score (audience/engagement_score.py): human opens and clicks, decaying.
    engagement_open_points: float = Field(1.0, ge=0, le=1e6)  # a human open adds this
    engagement_click_points: float = Field(3.0, ge=0, le=1e6)  # a human click adds this
    # The score halves in this many days. Changing it re-reads nothing by itself: see rebuild().
    engagement_half_life_days: float = Field(14.0, ge=0.01, le=36500)
    engagement_interval: float = Field(10.0, gt=0)  # beat's look at the event stream for new opens and clicks

    # The HTTP API (smartmail web).
    web_workers: int = Field(2, ge=1, le=64)  # uvicorn worker processes
    # Threads per web process running the sync routes, each holding a database connection at most;
    # the engines' pools keep that many, so none is opened and closed per request under load.
    web_threads: int = Field(10, ge=1, le=200)
    api_rate_limit: float = Field(50.0, gt=0)  # requests/s per API key, unless the key sets its own
    api_rate_burst: int | None = Field(None, ge=1)  # requests a key may send back to back; default: 2 s worth
    api_key_cache_seconds: float = Field(5.0, ge=0)  # a key's row is re-read after this (revocation is immediate)
    api_key_touch_seconds: float = Field(60.0, ge=0)  # last_used_at is written at most this often per key
    api_max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # JSON request bodies; larger: 413
    api_max_upload_bytes: int = Field(1024 * 1024 * 1024, ge=1024)  # import uploads; larger: 413
    api_upload_dir: Path = Path("uploads")  # where import uploads are streamed to
    api_idempotency_seconds: float = Field(86400.0, gt=0)  # how long an Idempotency-Key's response is kept
    api_cors_origins: list[str] = []  # browser origins allowed to call the API; none by default

    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp_url(cls, value: str) -> str:
        SmtpUrl.parse(value)
        return value

    @field_validator("default_sender")
    @classmethod
    def _check_sender(cls, value: str) -> str:
        try:
            parse_mailbox(value, field="default_sender")
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")):
            # psycopg 3 is the driver we ship; plain postgresql:// would pick psycopg2.
            value = "postgresql+psycopg://" + value.split("://", 1)[1]
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @field_validator("webhook_allow_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP network (a CIDR such as 10.0.0.0/8)") from None
        return value

    @field_validator("webhook_nameservers")
    @classmethod
    def _check_nameservers(cls, value: list[str]) -> list[str]:
        for nameserver in value:
            parse_nameserver(nameserver)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_retry_schedule(cls, value: list[float]) -> list[float]:
        if not value or any(wait < 0 for wait in value):
            raise ValueError("must list at least one wait, none negative (seconds before each attempt)")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an http(s):// base URL without query or fragment, e.g. https://mail.example.com")
        return value.rstrip("/")

    @property
    def smtp(self) -> SmtpUrl:
        return SmtpUrl.parse(self.smtp_url)

    @property
    def sender_domain(self) -> str:
        return self.message_id_domain or parse_mailbox(self.default_sender).domain


def load_settings() -> Settings:
    """Read the environment; raise SettingsError naming each bad SMARTMAIL_* variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "SMARTMAIL_" + str(error["loc"][0]).upper() if error["loc"] else "SMARTMAIL_*"
            reason = "is required but not set" if error["type"] == "missing" else error["msg"]
            problems.append(f"{name}: {reason}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


@runtime.per_process()
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use; the first use also applies SMARTMAIL_LOG_LEVEL
    to SmartMail's logs, unless the application configured logging itself (logs.configure_for_library)."""
    settings = load_settings()
    configure_for_library(settings.log_level, settings.log_format)
    return settings
