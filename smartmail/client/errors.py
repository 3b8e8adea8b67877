"""The client's exceptions: one per kind of RFC 9457 problem the API answers, and one for a lost connection."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class SmartMailError(Exception):
    """Anything the client raises."""


class ConnectionFailed(SmartMailError):
    """No answer from the server (refused, dropped, timed out), after the retries; the httpx error is the cause."""


class ApiError(SmartMailError):
    """An error response: its status and the problem document's title, detail and per-field `errors`."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.request_id = request_id
        self.problem = problem or {}
        super().__init__(status, detail)

    @property
    def code(self) -> str | None:
        """The problem's machine-readable `code` extension, when it has one."""
        code = self.problem.get("code")
        return code if isinstance(code, str) else None

    def __str__(self) -> str:
        text = f"{self.status} {self.title}: {self.detail}"
        return f"{text} (request {self.request_id})" if self.request_id else text


class BadRequest(ApiError):
    """400."""


class Unauthorized(ApiError):
    """401: no usable API key (missing, malformed, unknown, revoked or expired)."""


class Forbidden(ApiError):
    """403: the key lacks the scope the operation needs."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409: the resource's state forbids the change, or a request with the same Idempotency-Key is in flight."""


class ValidationFailed(ApiError):
    """422: `errors` names each bad field by a JSON pointer into the request (or the parameter)."""


class RateLimited(ApiError):
    """429: the key is over its rate limit; `retry_after` seconds until a request may go (when the server said)."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    429: RateLimited,
}


def retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Seconds the `Retry-After` header asks to wait: delay-seconds or an HTTP-date (RFC 9110 section 10.2.3)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from(response: httpx.Response) -> ApiError:
    """The exception for an error response; a body that is no problem document (a proxy's page) is the detail."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem = body if isinstance(body, dict) else {}
    status = response.status_code
    title = str(problem.get("title") or response.reason_phrase or status)
    detail = problem.get("detail")
    if not isinstance(detail, str):
        detail = response.text[:500] if not problem else title
    errors = problem.get("errors")
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    fields: dict[str, Any] = {
        "errors": errors if isinstance(errors, list) else None,
        "request_id": response.headers.get("x-request-id"),
        "problem": problem,
    }
    if kind is RateLimited:
        fields["retry_after"] = retry_after(response)
    return kind(status, title, detail, **fields)
