"""One logical API call: the request built once, then sent until it succeeds or the retries run out."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any

import httpx

from smartmail.client.errors import ConnectionFailed, error_from, retry_after

log = logging.getLogger("smartmail.client")

# 429 and 503 say "later" (with Retry-After); 502 and 504 are a proxy that did not reach the app.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
IN_FLIGHT_WAIT = 1.0  # a 409 for a first request still running, when it gives no Retry-After
# Failures before a byte of the request left: the server cannot have acted on it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Failures worth a new attempt: the network, not the request (not UnsupportedProtocol, LocalProtocolError).
_RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _json_default(value: Any) -> str:
    if isinstance(value, date | datetime):
        return value.isoformat()  # the API reads a datetime without an offset as UTC
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _in_flight(response: httpx.Response) -> bool:
    """A 409 saying a request with this Idempotency-Key is still running: its outcome is coming, so wait."""
    if response.status_code != 409:
        return False
    try:
        problem = response.json()
    except ValueError:
        return False
    if not isinstance(problem, dict):
        return False
    return problem.get("code") == "idempotency_in_flight"


class Transport:
    """Sends requests through an httpx client and retries what is safe to retry.

    Every POST carries an `Idempotency-Key` (the caller's, else a new uuid4), the same on each of its
    attempts, so the server answers a retry with the first outcome instead of acting twice. Other
    methods are idempotent by themselves. Waits grow exponentially with jitter, or follow Retry-After.
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.http = http
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.sleep = sleep
        self.jitter = jitter

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        files: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """The response to one logical call, after any retries; an ApiError for an error response."""
        headers = {}
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        content = None
        if json_body is not None:
            content = json.dumps(json_body, default=_json_default).encode()
            headers["Content-Type"] = "application/json"
        query = {name: value for name, value in (params or {}).items() if value is not None}
        # Built once: a multipart body keeps its boundary, so every attempt has the same fingerprint.
        request = self.http.build_request(
            method, path, content=content, params=query, data=data, files=files, headers=headers
        )
        maybe_applied = False
        attempt = 0
        while True:
            try:
                response = self.http.send(request)
            except _RETRYABLE as exc:
                maybe_applied = maybe_applied or not isinstance(exc, _NOT_SENT)
                if attempt >= self.max_retries:
                    raise ConnectionFailed(f"{method} {request.url.path}: {exc!r}") from exc
                delay = self._backoff(attempt)
                reason = type(exc).__name__
            else:
                if response.is_success:
                    return response
                if method == "DELETE" and response.status_code == 404 and maybe_applied:
                    return response  # an attempt that lost its answer did delete it
                wait = self._wait_for(response, attempt)
                if wait is None or attempt >= self.max_retries:
                    raise error_from(response)
                delay, reason = wait, str(response.status_code)
            attempt += 1
            log.info(
                "retry %d/%d of %s %s after %s in %.2f s",
                attempt,
                self.max_retries,
                method,
                request.url.path,
                reason,
                delay,
            )
            self.sleep(delay)

    def call(self, method: str, path: str, **options: Any) -> Any:
        """The decoded body of one call: JSON, text for another type, None when empty (204)."""
        response = self.request(method, path, **options)
        if not response.content:
            return None
        if response.headers.get("content-type", "").split(";")[0].strip().endswith("json"):
            return response.json()
        return response.text

    def paginate(self, path: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
        """Every item of a listing, page after page, following `next_cursor` until it is null."""
        cursor = None
        while True:
            page = self.call("GET", path, params={**(params or {}), "cursor": cursor})
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": half the exponential step plus a random half, so clients that failed together
        # spread out and none retries at once.
        # https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
        step = min(self.max_wait, self.backoff * 2**attempt)
        return step / 2 + self.jitter() * step / 2

    def _wait_for(self, response: httpx.Response, attempt: int) -> float | None:
        """How long to wait before retrying this error response, or None when it is not worth a retry
        (not a transient status, or a Retry-After longer than `max_wait`: the caller decides then)."""
        in_flight = _in_flight(response)
        if response.status_code not in RETRY_STATUSES and not in_flight:
            return None
        told = retry_after(response)
        if told is None:
            return IN_FLIGHT_WAIT + self.jitter() * self.backoff if in_flight else self._backoff(attempt)
        if told > self.max_wait:
            return None
        # Retry-After is the earliest moment; a little jitter on top keeps waiting clients apart.
        return told + self.jitter() * self.backoff
