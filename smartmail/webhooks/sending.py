"""The HTTP side of webhook delivery: signed POSTs over one keep-alive client per drain, concurrent up to a cap."""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Sequence
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
        http2=True,
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
    """At most `rate` request starts a second (None: no limit), for one endpoint's drain."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1 / rate if rate else 0.0
        self.next_start = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


async def send_all(
    http: httpx.AsyncClient,
    url: str,
    requests: Sequence[Request],
    secrets: Sequence[str],
    *,
    max_in_flight: int,
    pacer: Pacer,
    total_timeout: float,
    max_response_bytes: int,
    give_up_after: int,
) -> list[Outcome | None]:
    """POST the requests, at most `max_in_flight` at once: an outcome per request, in order, or None
    for one not sent because `give_up_after` requests in a row had failed (a dead endpoint's round
    ends after a wave of timeouts instead of timing out every request in turn) or one answered 410."""
    slots = asyncio.Semaphore(max_in_flight)
    failures_in_a_row = 0

    async def one(request: Request) -> Outcome | None:
        nonlocal failures_in_a_row
        async with slots:
            if failures_in_a_row >= give_up_after:
                return None
            await pacer.wait()
            outcome = await post(http, url, request, secrets, total_timeout, max_response_bytes)
            failures_in_a_row = 0 if outcome.ok else failures_in_a_row + 1
            if outcome.status == 410:  # Gone: the endpoint is disabled, nothing more goes to it
                failures_in_a_row = give_up_after
            return outcome

    return list(await asyncio.gather(*(one(request) for request in requests)))


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
    headers = headers_for(request.webhook_id, request.body, secrets)
    started = time.perf_counter()
    status: int | None = None
    error: str | None = None
    body = bytearray()
    try:
        async with asyncio.timeout(total_timeout):
            async with http.stream("POST", url, content=request.body, headers=headers) as response:
                status = response.status_code
                async for chunk in response.aiter_raw():
                    body += chunk[: max_response_bytes - len(body)]
                    if len(body) >= max_response_bytes:
                        break
    except TimeoutError:
        error = f"no answer within {total_timeout:g} s"
    except network_guard.BlockedAddress as exc:
        error = f"refused by the SSRF guard: {exc}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    latency = round((time.perf_counter() - started) * 1000)
    excerpt = bytes(body[:EXCERPT_BYTES]).decode("utf-8", "replace") if body else None
    # A 2xx status line is a delivery even if reading the rest of the answer then failed.
    return Outcome(status, error, latency, excerpt)
