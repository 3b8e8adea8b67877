"""`Client`: the SmartMail HTTP API v1 from another process, one attribute per resource."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from types import TracebackType

import httpx

from smartmail.client import resources
from smartmail.client.transport import Transport

USER_AGENT = "smartmail-client/0.1"


class Client:
    """`Client("https://mail.example.com", "sm_…")`; use it as a context manager, or `close()` it.

    Errors raise `ApiError` subclasses (`NotFound`, `ValidationFailed`, …) built from the problem
    document. 429, 502, 503 and 504, a 409 for a request still in flight, and connection errors or
    timeouts are retried up to `max_retries` times, waiting as Retry-After says (when longer than
    `max_wait`, the error is raised at once) or else exponentially with jitter from `backoff` seconds.
    `transport` (an httpx transport), `sleep` and `jitter` are for tests.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not api_key:
            raise ValueError("api_key: an API key `sm_<id>_<secret>` is required")
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )
        http = Transport(
            self._http, max_retries=max_retries, backoff=backoff, max_wait=max_wait, sleep=sleep, jitter=jitter
        )
        self.messages = resources.Messages(http)
        self.contacts = resources.Contacts(http)
        self.lists = resources.Lists(http)
        self.imports = resources.Imports(http)
        self.templates = resources.Templates(http)
        self.segments = resources.Segments(http)
        self.events = resources.Events(http)
        self.suppressions = resources.Suppressions(http)
        self.inbound = resources.Inbound(http)
        self.campaigns = resources.Campaigns(http)
        self.keys = resources.Keys(http)
        self.webhooks = resources.Webhooks(http)
        self.workflows = resources.Workflows(http)
        self.analytics = resources.Analytics(http)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"  # never the key
