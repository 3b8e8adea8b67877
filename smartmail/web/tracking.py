"""Tracking endpoints: /t/c (click: 302 to the signed URL) and /t/o (open: the pixel), recorded in the background."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time

import redis
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

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
# Never cached: a cached pixel or redirect would hide the next open or click.
_NO_STORE = {"Cache-Control": "no-store, max-age=0", "Pragma": "no-cache"}
_FLUSH_SECONDS = 0.05  # how long a hit waits in the process before it is written to Redis
_MAX_FLUSH = 10_000  # hits written in one round trip
_RETRY_SECONDS = 1.0  # while Redis does not answer
_WARN_SECONDS = 10.0  # at most one line per this while Redis is down

router = APIRouter(include_in_schema=False)


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
            if not self.pending:
                continue
            try:
                await self.flush()
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
            pipe.set(f"{settings.redis_key_prefix}{engagement.STREAM}:drain-asked", "1", nx=True, px=1000)
            *_, asked = await pipe.execute()
        for _ in batch:
            self.pending.popleft()
        if self.warned or self.dropped:
            log.warning("tracking.redis_back", dropped=self.dropped)
            self.warned, self.dropped = 0.0, 0
        if asked:  # at most one request a second from all processes: the drain empties the stream
            await asyncio.to_thread(_ask_for_drain)

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


def _hit(request: Request, kind: str, message_id: str, link: int = 0, url: str | None = None) -> Hit:
    settings = get_settings()
    ip = request.client.host if request.client else None
    return Hit(
        kind=kind,
        message_id=message_id,
        at=time.time(),
        link=link,
        url=url,
        ip=privacy.truncate_ip(ip, settings.tracking_ip_prefix_v4, settings.tracking_ip_prefix_v6),
        user_agent=request.headers.get("user-agent"),
        head=request.method == "HEAD",
    )


def _not_found() -> Response:
    return Response("This link is not valid.\n", status_code=404, media_type="text/plain", headers=_NO_STORE)


@router.api_route("/t/c/{token}", methods=["GET", "HEAD"])
async def click(token: str, request: Request) -> Response:
    """302 to the URL signed into the token; 404, and no redirect, for any token not ours."""
    try:
        found = tracking_links.read_click(token)
    except InvalidToken:
        return _not_found()
    recorder().add(_hit(request, engagement.CLICK, found.message_id, found.link, found.url))
    if found.url is None:  # the hidden honeypot link: nowhere to go
        return Response(status_code=204, headers=_NO_STORE)
    return RedirectResponse(found.url, status_code=302, headers={**_NO_STORE, "Referrer-Policy": "no-referrer"})


@router.api_route("/t/o/{token}", methods=["GET", "HEAD"])
async def open_pixel(token: str, request: Request) -> Response:
    """The pixel, at once; 404 for any token not ours."""
    try:
        message_id = tracking_links.read_open(token)
    except InvalidToken:
        return _not_found()
    recorder().add(_hit(request, engagement.OPEN, message_id))
    return Response(PIXEL, media_type="image/gif", headers=_NO_STORE)
