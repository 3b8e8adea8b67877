"""Unit tests for smartmail.config.settings: the SMTP URL parser and loading settings from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smartmail.config import settings as settings_module
from smartmail.config.settings import Settings, SettingsError, SmtpUrl, get_settings, load_settings

# --- SmtpUrl.parse ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://relay.example.com", SmtpUrl("relay.example.com", 25, "none")),
        ("smtp://relay.example.com?tls=none", SmtpUrl("relay.example.com", 25, "none")),
        ("smtp://relay.example.com?tls=starttls", SmtpUrl("relay.example.com", 587, "starttls")),
        ("smtp://relay.example.com?tls=ssl", SmtpUrl("relay.example.com", 465, "ssl")),
        ("smtps://relay.example.com", SmtpUrl("relay.example.com", 465, "ssl")),
        ("smtps://relay.example.com?tls=starttls", SmtpUrl("relay.example.com", 587, "starttls")),
        ("smtp://relay.example.com:2525", SmtpUrl("relay.example.com", 2525, "none")),
        ("smtp://relay.example.com:2525?tls=starttls", SmtpUrl("relay.example.com", 2525, "starttls")),
        ("smtps://relay.example.com:10465", SmtpUrl("relay.example.com", 10465, "ssl")),
        ("smtp://127.0.0.1:8025?tls=none", SmtpUrl("127.0.0.1", 8025, "none")),
        ("smtp://[::1]:2525", SmtpUrl("::1", 2525, "none")),
        ("smtp://Relay.EXAMPLE.com", SmtpUrl("relay.example.com", 25, "none")),
        ("smtp://relay.example.com:65535", SmtpUrl("relay.example.com", 65535, "none")),
    ],
)
def test_parse_hosts_ports_and_tls_modes(url, expected):
    assert SmtpUrl.parse(url) == expected


def test_parse_user_and_password():
    url = SmtpUrl.parse("smtp://mailer:s3cret@relay.example.com:587?tls=starttls")
    assert (url.username, url.password) == ("mailer", "s3cret")
    assert (url.host, url.port, url.tls) == ("relay.example.com", 587, "starttls")


def test_parse_percent_encoded_user_and_password():
    url = SmtpUrl.parse("smtp://apikey%40example.com:p%40ss%3Aw%2Fo%23rd%25@relay.example.com")
    assert url.username == "apikey@example.com"
    assert url.password == "p@ss:w/o#rd%"
    assert url.host == "relay.example.com"


def test_parse_plus_in_password_is_not_a_space():
    assert SmtpUrl.parse("smtp://u:a+b@h.example.com").password == "a+b"


def test_parse_user_without_password():
    url = SmtpUrl.parse("smtp://mailer@relay.example.com")
    assert (url.username, url.password) == ("mailer", None)


def test_parse_without_credentials():
    url = SmtpUrl.parse("smtp://relay.example.com")
    assert url.username is None and url.password is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://relay.example.com", "scheme must be smtp:// or smtps://, got 'http'"),
        ("SMTPX://relay.example.com", "scheme must be"),
        ("relay.example.com:25", "scheme must be"),
        ("relay.example.com", "got 'none'"),
        ("", "got 'none'"),
        ("smtp://", "a host is required"),
        ("smtp:///path-only", "a host is required"),
        ("smtp://:25", "a host is required"),
        ("smtp://relay.example.com?tls=yes", "tls must be none, starttls or ssl, got 'yes'"),
        ("smtp://relay.example.com?tls=SSL", "tls must be none, starttls or ssl"),
        ("smtp://relay.example.com?timeout=5", "unknown query parameter(s): timeout"),
        ("smtp://relay.example.com?tls=ssl&b=1&a=2", "unknown query parameter(s): a, b"),
        ("smtp://relay.example.com:abc", "bad port"),
        ("smtp://relay.example.com:70000", "bad port"),
        ("smtp://relay.example.com:-1", "bad port"),
    ],
)
def test_parse_rejects_bad_urls(url, message):
    with pytest.raises(ValueError) as info:
        SmtpUrl.parse(url)
    assert message in str(info.value)


def test_parse_rejects_port_zero():
    with pytest.raises(ValueError, match="port"):
        SmtpUrl.parse("smtp://relay.example.com:0")


# --- load_settings ------------------------------------------------------------------------------

SENDER = "SmartMail <noreply@example.com>"
SECRET = "0123456789abcdef-secret"


@pytest.fixture
def env(monkeypatch):
    """A clean SMARTMAIL_* environment with only the required variables set; returns a setter."""
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAIL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", SENDER)
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", SECRET)
    get_settings.forget()
    yield monkeypatch
    get_settings.forget()


def _error() -> str:
    with pytest.raises(SettingsError) as info:
        load_settings()
    return str(info.value)


def test_load_settings_with_only_the_required_variables(env):
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.default_sender == SENDER
    assert s.secret_key == SECRET
    assert s.database_url == "sqlite:///smartmail.db"
    assert s.transport == "smtp"
    assert s.smtp == SmtpUrl("127.0.0.1", 8025, "none")
    assert s.batch_size == 100
    assert s.smtp_max_messages_per_connection == 100
    assert s.file_transport_dir == Path("outbox")
    assert s.sender_domain == "example.com"


def test_environment_values_are_read_and_typed(env):
    env.setenv("SMARTMAIL_SMTP_URL", "smtp://u:p%40ss@relay.example.com?tls=starttls")
    env.setenv("SMARTMAIL_BATCH_SIZE", "250")
    env.setenv("SMARTMAIL_SMTP_TIMEOUT", "7.5")
    env.setenv("SMARTMAIL_TRANSPORT", "file")
    env.setenv("SMARTMAIL_FILE_TRANSPORT_DIR", "/tmp/outbox")
    env.setenv("SMARTMAIL_MESSAGE_ID_DOMAIN", "mail.example.org")
    s = load_settings()
    assert s.smtp == SmtpUrl("relay.example.com", 587, "starttls", "u", "p@ss")
    assert s.batch_size == 250
    assert s.smtp_timeout == 7.5
    assert s.transport == "file"
    assert s.file_transport_dir == Path("/tmp/outbox")
    assert s.sender_domain == "mail.example.org"


@pytest.mark.parametrize("missing", ["SMARTMAIL_DEFAULT_SENDER", "SMARTMAIL_SECRET_KEY"])
def test_missing_required_variable_is_named(env, missing):
    env.delenv(missing)
    message = _error()
    assert f"{missing}: is required but not set" in message
    other = ({"SMARTMAIL_DEFAULT_SENDER", "SMARTMAIL_SECRET_KEY"} - {missing}).pop()
    assert other not in message


def test_all_problems_are_reported_at_once(env):
    env.delenv("SMARTMAIL_DEFAULT_SENDER")
    env.delenv("SMARTMAIL_SECRET_KEY")
    env.setenv("SMARTMAIL_BATCH_SIZE", "0")
    message = _error()
    for name in ("SMARTMAIL_DEFAULT_SENDER", "SMARTMAIL_SECRET_KEY", "SMARTMAIL_BATCH_SIZE"):
        assert name in message


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("SMARTMAIL_SMTP_URL", "http://relay.example.com", "scheme must be smtp:// or smtps://"),
        ("SMARTMAIL_SMTP_URL", "smtp://relay.example.com?tls=maybe", "tls must be"),
        ("SMARTMAIL_SMTP_URL", "smtp://relay.example.com:notaport", "bad port"),
        ("SMARTMAIL_DEFAULT_SENDER", "not an address", "default_sender"),
        ("SMARTMAIL_DEFAULT_SENDER", "a@example.com, b@example.com", "exactly one address"),
        ("SMARTMAIL_DEFAULT_SENDER", "", "required"),
        ("SMARTMAIL_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("SMARTMAIL_BATCH_SIZE", "10001", "less than or equal to 10000"),
        ("SMARTMAIL_BATCH_SIZE", "many", "integer"),
        ("SMARTMAIL_SECRET_KEY", "too-short", "at least 16 characters"),
        ("SMARTMAIL_TRANSPORT", "pigeon", "'smtp', 'file', 'console' or 'memory'"),
        ("SMARTMAIL_DATABASE_URL", "mysql://db.example.com/mail", "sqlite:/// or postgresql+psycopg://"),
        ("SMARTMAIL_SMTP_TIMEOUT", "0", "greater than 0"),
        ("SMARTMAIL_RETRY_JITTER", "1.5", "less than or equal to 1"),
        ("SMARTMAIL_SMTP_MAX_MESSAGES_PER_CONNECTION", "0", "greater than or equal to 1"),
        ("SMARTMAIL_LOG_FORMAT", "xml", "'console' or 'json'"),
        ("SMARTMAIL_WEBHOOK_ALLOW_NETWORKS", '["10.0.0.0/8", "intranet"]', "'intranet' is not an IP network"),
        ("SMARTMAIL_WEBHOOK_NAMESERVERS", '["127.0.0.1:5353", "dns.example.com"]', "is not a nameserver"),
        ("SMARTMAIL_WEBHOOK_NAMESERVERS", '["127.0.0.1:70000"]', "is not a nameserver"),
        ("SMARTMAIL_WEBHOOK_RETRY_SCHEDULE", "[0, -5]", "none negative"),
        ("SMARTMAIL_WEBHOOK_RETRY_SCHEDULE", "[]", "at least one wait"),
    ],
)
def test_malformed_variable_is_named(env, variable, value, reason):
    env.setenv(variable, value)
    message = _error()
    assert message.startswith("invalid configuration: ")
    assert f"{variable}: " in message
    assert reason in message
    # Only the bad variable is blamed.
    assert message.count("SMARTMAIL_") == 1


def test_settings_error_does_not_echo_the_smtp_password(env):
    env.setenv("SMARTMAIL_SMTP_URL", "smtp://mailer:hunter2-secret@relay.example.com?tls=nope")
    message = _error()
    assert "SMARTMAIL_SMTP_URL" in message
    assert "hunter2-secret" not in message


def test_settings_error_does_not_echo_the_secret_key(env):
    env.setenv("SMARTMAIL_SECRET_KEY", "shortsecret")
    assert "shortsecret" not in _error()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "postgresql://mail:pw@db.example.com:5432/smartmail",
            "postgresql+psycopg://mail:pw@db.example.com:5432/smartmail",
        ),
        ("postgresql+psycopg://mail@db/smartmail", "postgresql+psycopg://mail@db/smartmail"),
        ("sqlite:////var/lib/smartmail.db", "sqlite:////var/lib/smartmail.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_database_url_driver(env, value, expected):
    env.setenv("SMARTMAIL_DATABASE_URL", value)
    assert load_settings().database_url == expected


def test_database_url_postgres_scheme_alias_is_rewritten(env):
    env.setenv("SMARTMAIL_DATABASE_URL", "postgres://mail:pw@db.example.com/smartmail")
    assert load_settings().database_url == "postgresql+psycopg://mail:pw@db.example.com/smartmail"


def test_lowercase_variable_names_are_read_too(env):
    env.delenv("SMARTMAIL_DEFAULT_SENDER")
    env.setenv("smartmail_default_sender", "ops@example.net")
    assert load_settings().default_sender == "ops@example.net"


def test_get_settings_is_cached_until_cleared(env):
    first = get_settings()
    env.setenv("SMARTMAIL_BATCH_SIZE", "7")
    assert get_settings() is first and first.batch_size == 100
    get_settings.forget()
    assert get_settings().batch_size == 7


def test_get_settings_raises_settings_error_for_a_bad_environment(env):
    env.delenv("SMARTMAIL_SECRET_KEY")
    with pytest.raises(SettingsError, match="SMARTMAIL_SECRET_KEY"):
        get_settings()


def test_settings_error_is_a_runtime_error():
    assert issubclass(SettingsError, RuntimeError)
    assert settings_module.SettingsError is SettingsError
