"""API keys: create (shown once), list, revoke, and authenticate a bearer token without a write per request."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from sqlalchemy import select, update

from smartmail import runtime
from smartmail.access.scopes import check_scopes
from smartmail.config import get_settings
from smartmail.errors import InvalidInput, NotFound, Unauthenticated
from smartmail.store.engine import reader, session_scope, utcnow
from smartmail.store.models import ApiKey

log = structlog.get_logger("smartmail.access")

PREFIX = "sm_"
# sm_<key id>_<secret>: the id is lower-case hex (no `_`), the secret 32 random bytes in base64url.
_TOKEN = re.compile(r"sm_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"[0-9a-f]{16}")

MAX_RATE = 1_000_000  # requests per second a key may be given (the limiter's arithmetic stays finite)


@dataclass(frozen=True)
class Principal:
    """The key a request authenticated with (never its secret)."""

    key_id: str
    name: str
    scopes: frozenset[str]
    rate_limit: float | None
    burst: int | None


@dataclass(frozen=True)
class _Cached:
    principal: Principal
    secret_hash: str
    expires_at: datetime | None
    revoked: bool
    read_at: float


def _hash(secret: str) -> str:
    # A plain SHA-256 suffices: the secret is 256 random bits, so there is nothing to brute-force
    # (a slow password hash would cost milliseconds per request for no gain); GitHub's tokens alike.
    return hashlib.sha256(secret.encode()).hexdigest()


def as_dict(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "scopes": list(row.scopes),
        "rate_limit": row.rate_limit,
        "burst": row.burst,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "expires_at": row.expires_at,
        "revoked": row.revoked_at is not None,
        "revoked_at": row.revoked_at,
    }


def create_key(
    name: str,
    scopes: list[str],
    *,
    expires_at: datetime | None = None,
    rate_limit: float | None = None,
    burst: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Store a new key; return its record and the token `sm_<id>_<secret>`, which is never shown again."""
    name = (name or "").strip()
    if not name or len(name) > 200 or not name.isprintable():
        raise InvalidInput("a name of 1 to 200 printable characters is required", field="name")
    scopes = check_scopes(list(scopes))
    if expires_at is not None and expires_at.tzinfo is not None:  # stored, and compared, as naive UTC
        try:
            expires_at = expires_at.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # past year 9999 in UTC
            raise InvalidInput("is out of range", field="expires_at") from None
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput("must be in the future", field="expires_at")
    if rate_limit is not None and not 0 < rate_limit <= MAX_RATE:
        raise InvalidInput(f"must be a number of requests per second above 0, at most {MAX_RATE:,}", field="rate_limit")
    if burst is not None and burst < 1:
        raise InvalidInput("must be at least 1", field="burst")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id,
        name=name,
        secret_hash=_hash(secret),
        scopes=scopes,
        rate_limit=rate_limit,
        burst=burst,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    with session_scope() as session:
        session.add(row)
    log.info("api_key.created", key_id=key_id, name=name, scopes=scopes)
    return as_dict(row), f"{PREFIX}{key_id}_{secret}"


def list_keys(*, include_revoked: bool = True) -> list[dict[str, Any]]:
    with session_scope() as session:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return [as_dict(row) for row in session.scalars(query)]


def _row(session, key_id: str) -> ApiKey:
    # Only an id shaped like ours is looked up (PostgreSQL would refuse one holding a NUL).
    row = session.get(ApiKey, key_id) if _KEY_ID.fullmatch(key_id) else None
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    return row


def get_key(key_id: str) -> dict[str, Any]:
    with session_scope() as session:
        return as_dict(_row(session, key_id))


def revoke_key(key_id: str) -> dict[str, Any]:
    """Revoke a key at once, in every web process: the database says so, and a Redis mark that the
    per-request rate-limit call reads (a process that misses it re-reads the row within the cache time)."""
    with session_scope() as session:
        row = _row(session, key_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        record = as_dict(row)
    _cache.pop(key_id, None)
    try:
        _redis().set(revoked_mark(key_id), 1)
    except redis.RedisError as exc:
        log.warning("api_key.revoke_mark_failed", key_id=key_id, error=str(exc))
    log.info("api_key.revoked", key_id=key_id)
    return record


def revoked_mark(key_id: str) -> str:
    return f"{get_settings().redis_key_prefix}smartmail:apikey:{key_id}:revoked"


@runtime.per_process(close=lambda client, close: client.close() if close else None)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=3)


# --- Authentication ---------------------------------------------------------------------------------

_cache: dict[str, _Cached] = {}
_touched: dict[str, float] = {}
_touch_lock = threading.Lock()


def _forget_all(_close: bool = True) -> None:
    _cache.clear()
    _touched.clear()


runtime.on_reset(_forget_all)


def key_id_of(token: str) -> str | None:
    """The key id a token names, without checking it (for per-key bookkeeping before auth runs)."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


def redact(text: str) -> str:
    """`text` with the secret of every API key in it replaced, for what is logged or echoed."""
    return _TOKEN.sub(r"sm_\1_[redacted]", text)


def _load(key_id: str) -> _Cached | None:
    with reader() as connection:
        row = connection.execute(select(ApiKey.__table__).where(ApiKey.id == key_id)).first()
    if row is None:
        return None
    principal = Principal(row.id, row.name, frozenset(row.scopes), row.rate_limit, row.burst)
    return _Cached(principal, row.secret_hash, row.expires_at, row.revoked_at is not None, time.monotonic())


def authenticate(token: str | None) -> Principal:
    """The key behind a bearer token, or Unauthenticated saying why not. A key's row is cached for
    `api_key_cache_seconds`; `last_used_at` is written at most every `api_key_touch_seconds`."""
    if not token:
        raise Unauthenticated("missing")
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise Unauthenticated("malformed")
    key_id, secret = match.groups()
    settings = get_settings()
    cached = _cache.get(key_id)
    if cached is None or time.monotonic() - cached.read_at >= settings.api_key_cache_seconds:
        cached = _load(key_id)
        if cached is None:
            _cache.pop(key_id, None)
            raise Unauthenticated("unknown")
        _cache[key_id] = cached
    if not hmac.compare_digest(cached.secret_hash, _hash(secret)):
        raise Unauthenticated("unknown")
    if cached.revoked:
        raise Unauthenticated("revoked")
    if cached.expires_at is not None and cached.expires_at <= utcnow():
        raise Unauthenticated("expired")
    _touch(key_id, settings.api_key_touch_seconds)
    return cached.principal


def check_key(key_id: str) -> Principal:
    """The key of a session holding only its id (the dashboard's), re-checked: Unauthenticated when
    it is unknown, revoked or expired. Its row is cached as for `authenticate`."""
    if not _KEY_ID.fullmatch(key_id):
        raise Unauthenticated("malformed")
    cached = _cache.get(key_id)
    if cached is None or time.monotonic() - cached.read_at >= get_settings().api_key_cache_seconds:
        cached = _load(key_id)
        if cached is None:
            _cache.pop(key_id, None)
            raise Unauthenticated("unknown")
        _cache[key_id] = cached
    if cached.revoked:
        raise Unauthenticated("revoked")
    if cached.expires_at is not None and cached.expires_at <= utcnow():
        raise Unauthenticated("expired")
    return cached.principal


def needs_database(token: str | None) -> bool:
    """Whether authenticate(token) would read or write the database now (its key's row not cached or
    stale, `last_used_at` due): an event loop then calls it in a worker thread."""
    match = _TOKEN.fullmatch(token or "")
    if match is None:
        return False
    key_id, now, settings = match.group(1), time.monotonic(), get_settings()
    cached = _cache.get(key_id)
    if cached is None or now - cached.read_at >= settings.api_key_cache_seconds:
        return True
    last = _touched.get(key_id)
    return last is None or now - last >= settings.api_key_touch_seconds


def forget(key_id: str) -> None:
    """Drop a key from this process's cache (the rate limiter found it revoked)."""
    _cache.pop(key_id, None)


def _touch(key_id: str, every: float) -> None:
    now = time.monotonic()
    with _touch_lock:
        last = _touched.get(key_id)
        if last is not None and now - last < every:
            return
        _touched[key_id] = now
    try:
        with session_scope() as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never fail a request
        log.warning("api_key.touch_failed", key_id=key_id, error=str(exc))
