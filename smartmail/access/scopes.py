"""The API's scopes: least privilege, one per resource and access (read | write), documented in the README."""

from __future__ import annotations

SCOPES: dict[str, str] = {
    "messages:send": "send transactional email (POST /v1/messages, /v1/messages/batch)",
    "messages:read": "read messages and their delivery state",
    "templates:read": "list, read and preview-render templates",
    "templates:write": "create template versions and delete templates",
    "contacts:read": "read contacts, lists, memberships and import jobs",
    "contacts:write": "create, change and erase contacts; lists, memberships and imports",
    "segments:read": "read, count and preview segments",
    "segments:write": "save and delete segments",
    "events:read": "read the event stream (GET /v1/events, /v1/messages/{id}/events)",
    "events:write": "ingest custom events (POST /v1/events)",
    "campaigns:read": "read campaigns and their progress",
    "campaigns:write": "create, change, schedule, launch, pause, resume and cancel campaigns",
    "workflows:read": "read workflows, their versions and status; simulate a contact's path",
    "workflows:write": "save workflows (a new version), pause, resume and move their enrolments; enrol contacts",
    "suppressions:read": "read the suppression list",
    "suppressions:write": "add to and remove from the suppression list",
    "inbound:read": "read the mail smartmail inbound received (bounces, complaints), its verdict and bytes",
    "inbound:write": "process failed inbound mail again",
    "webhooks:manage": "add, change, test and remove webhook endpoints; read and replay their deliveries",
    "analytics:read": "read campaign KPIs and trends (GET /v1/analytics/...)",
    "keys:manage": "create, list and revoke API keys",
}


def check_scopes(values: list[str], *, field: str = "scopes") -> list[str]:
    """The scopes, de-duplicated in the table's order; an unknown one raises InvalidInput naming it."""
    from smartmail.errors import InvalidInput

    if not values:
        raise InvalidInput(f"at least one scope is required; known scopes: {', '.join(SCOPES)}", field=field)
    for i, value in enumerate(values):
        if value not in SCOPES:
            raise InvalidInput(f"unknown scope {value!r}; known scopes: {', '.join(SCOPES)}", field=f"{field}[{i}]")
    return [scope for scope in SCOPES if scope in values]
