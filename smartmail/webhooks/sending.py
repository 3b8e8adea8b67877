"""The HTTP side of webhook delivery: signed POSTs over one keep-alive client per drain, concurrent up to a cap."""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from smartmail import __version__
from smartmail.config.settings import Settings
from smartmail.webhooks import network_guard
from smartmail.webhooks.signatures import headers_for

EXCERPT_BYTES = 1024  # of an answer's body kept with the attempt


@dataclass(frozen=True)
class Request:
    """One POST: a delivery, or a batch of them, under one `webhook-id`."""

    webhook_id: str
    delivery_ids: tuple[int, ...]
    body: bytes


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no answer (`error` says why)
    error: str | None
    latency_ms: int
    response: str | None  # the start of the answer's body

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def client(settings: Settings, allowed: Sequence, max_connections: int) -> httpx.AsyncClient:
    """A client whose every connection is checked by the SSRF guard when it is made; no redirects
    followed (a 3xx is a failed attempt), no proxies from the environment (they would bypass the guard)."""
    transport = network_guard.guarded_transport(
        resolver=network_guard.Resolver(settings.webhook_nameservers, field="SMARTMAIL_WEBHOOK_NAMESERVERS"),
        allowed=allowed,
        http2=settings.webhook_http2,
        max_connections=max_connections,
        verify=_tls_context(settings.webhook_ca_file),
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(settings.webhook_timeout, connect=settings.webhook_connect_timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": f"SmartMail-Webhooks/{__version__}", "accept-encoding": "identity"},
    )


@functools.lru_cache(maxsize=4)
def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    # Loading the default CA bundle costs milliseconds: once per process, not per drain.
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else httpx.create_ssl_context(trust_env=False)


class Pacer:
    """At most `rate` request starts a second (None: no limit) for one endpoint, its next start kept
    across drains (the endpoint's `paced_until`)."""

    def __init__(self, rate: float | None, next_start: float | None = None) -> None:
        self.interval = 1 / rate if rate else 0.0
        self.next_start = next_start if next_start is not None else time.monotonic()  # time.monotonic()

    async def wait(self, deadline: float = math.inf) -> bool:
        """Wait for the next start; False, without waiting, when it would come after `deadline`."""
        if not self.interval:
            return True
        now = time.monotonic()
        start = max(now, self.next_start)
        if start > deadline:
            return False
        self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)
        return True


class Round:
    """A round's requests sent at most `max_in_flight` at once; `completed()` yields each sent one with
    its outcome as it completes. Requests not started yet are left unsent (and not yielded) after
    `stop()`, after `give_up_after` failures in a row (a dead endpoint's round ends after a wave of
    timeouts instead of timing out every request in turn), or after a 410."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        secrets: Sequence[str],
        *,
        max_in_flight: int,
        pacer: Pacer,
        total_timeout: float,
        max_response_bytes: int,
        give_up_after: int,
        deadline: float = math.inf,
    ) -> None:
        self.http, self.url, self.secrets = http, url, secrets
        self.deadline = deadline  # time.monotonic(): no request starts after it
        self.slots = asyncio.Semaphore(max_in_flight)
        self.pacer = pacer
        self.total_timeout, self.max_response_bytes = total_timeout, max_response_bytes
        self.give_up_after = give_up_after
        self.failures_in_a_row = 0
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    async def completed(self, requests: Sequence[Request]) -> AsyncGenerator[tuple[Request, Outcome], None]:
        """Use in `contextlib.aclosing`: requests still running are cancelled if the caller stops early."""
        done: asyncio.Queue[tuple[Request, Outcome | None]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._send(request, done)) for request in requests]
        try:
            for _ in tasks:
                request, outcome = await done.get()
                if outcome is not None:
                    yield request, outcome
        finally:
            for task in tasks:
                task.cancel()

    async def _send(self, request: Request, done: asyncio.Queue[tuple[Request, Outcome | None]]) -> None:
        outcome: Outcome | None = None
        try:
            async with self.slots:
                if self.stopped or time.monotonic() >= self.deadline:
                    return
                if not await self.pacer.wait(self.deadline) or self.stopped:
                    return
                outcome = await post(
                    self.http, self.url, request, self.secrets, self.total_timeout, self.max_response_bytes
                )
            self.failures_in_a_row = 0 if outcome.ok else self.failures_in_a_row + 1
            if self.failures_in_a_row >= self.give_up_after or outcome.status == 410:
                self.stopped = True
        finally:
            done.put_nowait((request, outcome))  # always: completed() waits for one item per request


async def post(
    http: httpx.AsyncClient,
    url: str,
    request: Request,
    secrets: Sequence[str],
    total_timeout: float,
    max_response_bytes: int,
) -> Outcome:
    """One signed POST, cut at `total_timeout` whatever it is doing; the answer's body is read up to
    `max_response_bytes` and the rest dropped with the connection."""
    started = time.perf_counter()
    status: int | None = None
    error: str | None = None
    body = bytearray()
    try:
        headers = headers_for(request.webhook_id, request.body, secrets)
        async with asyncio.timeout(total_timeout):
            async with http.stream("POST", url, content=request.body, headers=headers) as response:
                status = response.status_code
                async for chunk in response.aiter_raw():
                    body += chunk[: max_response_bytes - len(body)]
                    if len(body) >= max_response_bytes:
                        break
    except TimeoutError:
        error = f"no answer within {total_timeout:g} s" if status is None else f"answer cut at {total_timeout:g} s"
    except network_guard.BlockedAddress as exc:
        error = f"refused by the SSRF guard: {exc}"
    except Exception as exc:  # noqa: BLE001 - one request's failure is its attempt's error, not the drain's
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    latency = round((time.perf_counter() - started) * 1000)
    excerpt = _text(bytes(body[:EXCERPT_BYTES])) if body else None
    # A 2xx status line is a delivery even if reading the rest of the answer then failed.
    return Outcome(status, _text(error.encode()) if error else None, latency, excerpt)


def _text(data: bytes) -> str:
    """Bytes from the endpoint as storable text: PostgreSQL keeps no NUL character in a text column."""
    return data.decode("utf-8", "replace").replace("\x00", "\ufffd")
