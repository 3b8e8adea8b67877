"""Tracking endpoints: /t/c (click: 302 to the signed URL) and /t/o (open: the pixel), recorded in the background."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from urllib.parse import quote

import redis
import structlog
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from smartmail.access.rate_limits import async_redis
from smartmail.config import get_settings
from smartmail.content import tracking_links
from smartmail.errors import InvalidToken
from smartmail.feedback import engagement, privacy
from smartmail.feedback.engagement import Hit
from smartmail.workers.dispatch import publish

log = structlog.get_logger("smartmail.tracking")

# The smallest transparent GIF: 1x1, one-colour palette, transparent (43 bytes).
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
_FLUSH_SECONDS = 0.05  # how long a hit waits in the process before it is written to Redis
_MAX_FLUSH = 10_000  # hits written in one round trip
_ASK_EVERY_MS = 1000  # drain requests, from all web processes together
_RETRY_SECONDS = 1.0  # while Redis does not answer
_WARN_SECONDS = 10.0  # at most one line per this while Redis is down


class Recorder:
    """The process's buffer of hits: the response never waits for Redis. A background task writes
    the buffer to the stream every few milliseconds, keeps it while Redis is down (up to
    SMARTMAIL_TRACKING_BUFFER_MAX hits, then the oldest are dropped and counted in the log) and
    asks for a drain by the events worker when it wrote something. Lost: what a process held when
    it died, and what overflowed the buffer."""

    def __init__(self) -> None:
        self.pending: collections.deque[Hit] = collections.deque()
        self.task: asyncio.Task | None = None
        self.dropped = 0
        self.warned = 0.0
        self.unasked = 0.0  # when hits written have not been followed by a drain request: ask again then

    def add(self, hit: Hit) -> None:
        settings = get_settings()
        if len(self.pending) >= settings.tracking_buffer_max:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(hit)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_SECONDS)
            try:
                if self.pending:
                    await self.flush()
                elif self.unasked and time.monotonic() >= self.unasked:
                    await self._ask()
            except (redis.RedisError, OSError) as exc:
                self._warn(exc)
                await asyncio.sleep(_RETRY_SECONDS)

    async def flush(self) -> None:
        """Write the buffered hits to the stream (one round trip), then ask for a drain."""
        batch = list(itertools.islice(self.pending, _MAX_FLUSH))
        if not batch:
            return
        settings = get_settings()
        client = async_redis()
        async with client.pipeline(transaction=False) as pipe:
            for hit in batch:
                pipe.xadd(engagement.stream_key(), hit.fields(), maxlen=settings.tracking_stream_max, approximate=True)
            await pipe.execute()
        for _ in batch:
            self.pending.popleft()
        if self.warned or self.dropped:
            log.warning("tracking.redis_back", dropped=self.dropped)
            self.warned, self.dropped = 0.0, 0
        await self._ask()

    async def _ask(self) -> None:
        """Ask the events worker for a drain: at most once a second from all web processes (the
        drain empties the stream). When another process asked within the second, ask again once
        it is over, or the last hits of a burst would wait for beat's periodic drain."""
        key = f"{get_settings().redis_key_prefix}{engagement.STREAM}:drain-asked"
        if await async_redis().set(key, "1", nx=True, px=_ASK_EVERY_MS):
            self.unasked = 0.0
            await asyncio.to_thread(_ask_for_drain)
        else:
            self.unasked = time.monotonic() + _ASK_EVERY_MS / 1000

    def _warn(self, exc: BaseException) -> None:
        if time.monotonic() - self.warned > _WARN_SECONDS:
            self.warned = time.monotonic()
            log.warning("tracking.redis_unavailable", error=str(exc), held=len(self.pending), dropped=self.dropped)


def _ask_for_drain() -> None:
    try:
        publish(engagement.DRAIN_TASK)
    except Exception as exc:  # noqa: BLE001 - beat's periodic drain stores the hits anyway
        log.warning("tracking.drain_not_asked", error=str(exc))


_recorders: dict[asyncio.AbstractEventLoop, Recorder] = {}


def recorder() -> Recorder:
    """The running event loop's recorder (one per web process)."""
    loop = asyncio.get_running_loop()
    if loop not in _recorders:
        _recorders.clear()  # a recorder belongs to its loop; tests start new loops
        _recorders[loop] = Recorder()
    return _recorders[loop]


async def flush_on_shutdown() -> None:
    """At shutdown: one last write of what is buffered (lost if Redis does not answer now)."""
    rec = _recorders.get(asyncio.get_running_loop())
    if rec is None:
        return
    if rec.task is not None:
        rec.task.cancel()
    with contextlib.suppress(redis.RedisError, OSError):
        await rec.flush()
    if rec.pending:
        log.warning("tracking.events_lost", count=len(rec.pending), why="shutdown while Redis did not answer")


def _hit(scope: Scope, kind: str, message_id: str, link: int = 0, url: str | None = None) -> Hit:
    settings = get_settings()
    client = scope.get("client")
    ip = privacy.truncate_ip(
        client[0] if client else None, settings.tracking_ip_prefix_v4, settings.tracking_ip_prefix_v6
    )
    return Hit(
        kind=kind,
        message_id=message_id,
        at=time.time(),
        link=link,
        url=url,
        ip=ip,
        user_agent=Headers(scope=scope).get("user-agent"),
        head=scope["method"] == "HEAD",
    )


# Every answer: never cached (a cached pixel or redirect would hide the next open or click), never
# sniffed, and no referrer passed on to the link's site.
_HEADERS = [
    (b"cache-control", b"no-store, max-age=0"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_NOT_FOUND = b"This link is not valid.\n"


def _answer(scope: Scope) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The answer to a tracking request; its hit handed to the recorder."""
    kind, token = scope["path"][3], scope["path"][5:]
    try:
        if kind == "o":
            message_id = tracking_links.read_open(token)
            recorder().add(_hit(scope, engagement.OPEN, message_id))
            return 200, [*_HEADERS, (b"content-type", b"image/gif"), (b"content-length", b"43")], PIXEL
        found = tracking_links.read_click(token)
    except InvalidToken:
        return 404, [*_HEADERS, (b"content-type", b"text/plain; charset=utf-8")], _NOT_FOUND
    recorder().add(_hit(scope, engagement.CLICK, found.message_id, found.link, found.url))
    if found.url is None:  # the hidden honeypot link: nowhere to go
        return 204, _HEADERS, b""
    # Non-ASCII characters percent-encoded, reserved ones kept (as Starlette's RedirectResponse does).
    location = quote(found.url, safe=":/%#?=@[]!$&'()*+,;~").encode()
    return 302, [*_HEADERS, (b"location", location), (b"content-length", b"0")], b""


class TrackingFront:
    """ASGI middleware, outermost: answers GET and HEAD of /t/c/<token> and /t/o/<token> itself,
    before routing and the API's middleware (request ids, idempotency, access log), which would
    cost more than the answer; everything else goes to the app. A click's record is its event, not
    an access-log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path.startswith(_PATHS) and scope["method"] in ("GET", "HEAD") and "/" not in path[5:]):
            await self.app(scope, receive, send)
            return
        status, headers, body = _answer(scope)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


_PATHS = ("/t/c/", "/t/o/")
