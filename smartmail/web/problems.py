"""RFC 9457 problem+json: one shape for every 4xx and 5xx, and the map from domain exceptions to statuses."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from smartmail.errors import (
    Conflict,
    FieldError,
    InvalidToken,
    NotFound,
    TemplateError,
    TemplateNotFound,
    Unauthenticated,
)
from smartmail.web.request_context import loggable_path

log = structlog.get_logger("smartmail.web")

PROBLEM_JSON = "application/problem+json"
# Every response: no MIME sniffing, and no Referer leaking the token in our URLs to other sites.
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_DETAILS = {404: "There is nothing at this URL.", 405: "This URL does not accept that method."}
_UNAUTHENTICATED = {
    "missing": "An API key is required: send `Authorization: Bearer <key>`.",
    "malformed": "The API key is malformed: keys look like sm_<id>_<secret>.",
    "unknown": "The API key is not valid.",
    "revoked": "The API key has been revoked.",
    "expired": "The API key has expired.",
}


def problem(status: int, detail: str, *, headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    """An RFC 9457 problem document: `about:blank` with the status phrase as title (section 4.2.1)."""
    content = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    content.update(extensions)
    return JSONResponse(
        content, status_code=status, media_type=PROBLEM_JSON, headers={**COMMON_HEADERS, **(headers or {})}
    )


def pointer(field: str) -> str:
    """A field path as the domain names it (`messages[3].to`) as a JSON pointer (`/messages/3/to`)."""
    return json_pointer(re.findall(r"[^.\[\]]+", field)) or "/"


def field_problem(status: int, field: str, reason: str) -> JSONResponse:
    return problem(status, f"{field}: {reason}", errors=[{"pointer": pointer(field), "detail": reason}])


def unauthenticated(reason: str) -> JSONResponse:
    # RFC 6750 section 3: no error code when no credentials were sent at all.
    challenge = 'Bearer realm="smartmail"'
    if reason != "missing":
        challenge += f', error="invalid_token", error_description="{_UNAUTHENTICATED[reason]}"'
    return problem(401, _UNAUTHENTICATED[reason], headers={"WWW-Authenticate": challenge}, reason=reason)


def json_pointer(parts: Iterable[object]) -> str:
    """RFC 6901: `~` and `/` escaped in each part ("" is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """Each bad field as a JSON pointer into the body, or the query/path/header parameter it names.
    Location and reason only: echoing the rejected input back could reflect secrets or megabytes."""
    errors = []
    for error in exc.errors():
        where, *path = list(error.get("loc", ())) or ["body"]
        reason = str(error.get("msg", "is not valid"))
        if error.get("type") == "json_invalid":  # its loc is a character position, not a field
            errors.append(
                {"pointer": "", "detail": f"the body is not valid JSON ({error.get('ctx', {}).get('error', reason)})"}
            )
        elif where == "body":
            # pydantic adds a `[key]` segment for a dict's key errors
            errors.append({"pointer": json_pointer(p for p in path if str(p) != "[key]"), "detail": reason})
        else:
            errors.append(
                {"parameter": ".".join(str(p) for p in path) or str(where), "in": str(where), "detail": reason}
            )
    return errors


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    status = exc.status_code
    detail = exc.detail if exc.detail != HTTPStatus(status).phrase else _DETAILS.get(status, exc.detail)
    headers = dict(exc.headers or {})
    if status == 405:
        headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
    return problem(status, str(detail), headers=headers)


def allowed_methods(request: Request) -> set[str]:
    """Every method some route accepts at the request's path: RFC 9110 section 15.5.6 wants them all
    in a 405's `Allow`, where Starlette names those of the first route that matched the path only."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE and route.methods:
            methods |= route.methods
    return methods


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = validation_errors(exc)
    first = errors[0] if errors else {}
    where = first.get("pointer") or first.get("parameter") or "the request"
    detail = f"{where}: {first.get('detail', 'is not valid')}" + (
        f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    )
    return problem(422, detail, errors=errors)


async def _field_error(request: Request, exc: FieldError) -> Response:
    return field_problem(422, exc.field, exc.reason)


async def _template_error(request: Request, exc: TemplateError) -> Response:
    return field_problem(422, exc.field, str(exc))


async def _not_found(request: Request, exc: LookupError) -> Response:
    return problem(404, str(exc.args[0]) if exc.args else "Not found.")


async def _unstorable(request: Request, exc: DataError) -> Response:
    # The last line of defence: input the checks above the database let through (a NUL character,
    # which PostgreSQL stores in no text column, a number out of a column's range) is the client's
    # error, not ours. Only the error's class is logged: its message holds the value.
    log.warning("web.unstorable_input", path=loggable_path(request.url.path), error=type(exc.orig).__name__)
    return problem(422, "The request holds a value the database cannot store (a NUL character, a number out of range).")


async def _conflict(request: Request, exc: Conflict) -> Response:
    return problem(409, str(exc))


async def _unauthenticated(request: Request, exc: Unauthenticated) -> Response:
    return unauthenticated(exc.reason)


async def _invalid_token(request: Request, exc: InvalidToken) -> Response:
    return problem(404, "There is nothing at this URL.")


async def unexpected_error(request: Request, exc: Exception) -> Response:
    request_id = log_unexpected(request)
    return problem(
        500,
        "An unexpected error occurred; it has been logged.",
        headers={"X-Request-Id": request_id} if request_id else None,
    )


def log_unexpected(request: Request) -> str | None:
    """Log the exception being handled with the request's id, and return that id: Starlette runs
    the 500 handler in its outermost middleware, outside RequestContext's log context and headers."""
    request_id = getattr(request.state, "request_id", None)
    path = loggable_path(request.url.path)
    log.exception("web.unexpected_error", path=path, method=request.method, request_id=request_id)
    return request_id


# What each documented error status means, for the OpenAPI document (declare_responses).
_RESPONSES = {
    400: "The request is malformed (an `Idempotency-Key` that is not 1 to 255 visible ASCII characters).",
    401: "No usable API key: missing, malformed, unknown, revoked or expired (`reason`; `WWW-Authenticate`).",
    403: "The key lacks the scope this operation needs (named in `detail` and `WWW-Authenticate`).",
    404: "Nothing at this URL (no such resource).",
    409: "A conflict with the current state, or a request with this `Idempotency-Key` still in flight "
    '(`"code": "idempotency_in_flight"`, `Retry-After`).',
    413: "The request body is larger than `SMARTMAIL_API_MAX_BODY_BYTES`.",
    415: "The request body is not of the media type this operation takes.",
    422: "A field or parameter is not valid: `errors` lists each as a JSON pointer (`pointer`) or a `parameter`.",
    429: "The key is over its rate limit; `Retry-After` says when to retry.",
}
_PROBLEM_SCHEMA = {
    "title": "Problem",
    "description": "RFC 9457 problem details; extension members (`errors`, `reason`, `code`, …) may follow.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
        "code": {"type": "string"},
    },
}
_WRITES = frozenset({"post", "put", "patch", "delete"})


def declare_responses(schema: dict[str, Any]) -> None:
    """Declare, on each /v1 operation of an OpenAPI document, the problem responses it can give
    (in place of FastAPI's 422 HTTPValidationError, a shape we never send): clients and the
    schema fuzzer then know every status an operation may answer."""
    reference = {"$ref": "#/components/schemas/Problem"}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            statuses = {422}
            if operation.get("security"):
                statuses |= {401, 403, 429}
            if "{" in path:
                statuses.add(404)
            if method in _WRITES:
                statuses |= {400, 409, 413}
            if set(operation.get("requestBody", {}).get("content", {})) - {"application/json"}:
                statuses.add(415)  # an upload's route names the media type it wants
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                if str(status) not in responses or status == 422:
                    responses[str(status)] = {"description": _RESPONSES[status]}
            for status, declared in responses.items():  # a router's own error responses too
                if status[0] in "45":
                    problem_content = declared.setdefault("content", {}).setdefault(PROBLEM_JSON, {})
                    problem_content.setdefault("schema", reference)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = _PROBLEM_SCHEMA
    if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def install(app: FastAPI) -> None:
    """Register the handlers; Starlette types handlers by Exception, hence the ignores."""
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(FieldError, _field_error)  # type: ignore[arg-type]
    app.add_exception_handler(TemplateError, _template_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(TemplateNotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(Conflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(DataError, _unstorable)  # type: ignore[arg-type]
    app.add_exception_handler(Unauthenticated, _unauthenticated)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidToken, _invalid_token)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error)
