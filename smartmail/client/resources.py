"""The API's resources as methods: each builds the request the v1 contract names and returns the decoded answer."""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime
from typing import IO, Any
from urllib.parse import quote

from smartmail.client.transport import Transport


def _segment(value: str | int) -> str:
    # A name or address is one path segment: `/`, `@`, `+`, `?` and `#` travel percent-encoded.
    return quote(str(value), safe="")


def _body(fields: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments as body keys: exactly those given (a None is sent: it clears a field),
    with `from_` as `from`, which Python cannot take as a keyword."""
    return {("from" if name == "from_" else name): value for name, value in fields.items()}


def _form_value(value: Any) -> Any:
    """A form field's value as httpx sends it; a mapping is the repeated `KEY=VALUE` fields the CLI takes."""
    if isinstance(value, Mapping):
        return [f"{key}={item}" for key, item in value.items()]
    return list(value) if isinstance(value, tuple) else value


class Resource:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _call(self, method: str, path: str, **options: Any) -> Any:
        return self._transport.call(method, path, **options)

    def _list(self, path: str, page_size: int | None, filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self._transport.paginate(path, {**filters, "limit": page_size})


class Messages(Resource):
    """/v1/messages (scopes messages:send, messages:read)."""

    def send(self, to: str, *, idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """Queue one email → `{id, state, reason, duplicate}`. Fields: template, subject, html, text,
        context, from_, reply_to, headers, tags, send_at, track."""
        body = {"to": to, **_body(fields)}
        return self._call("POST", "/v1/messages", json_body=body, idempotency_key=idempotency_key)

    def send_batch(self, messages: list[dict[str, Any]], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue up to 1,000 emails → `{accepted, rejected, results}`, a result per item in order."""
        body = {"messages": messages}
        return self._call("POST", "/v1/messages/batch", json_body=body, idempotency_key=idempotency_key)

    def get(self, message_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/messages/{_segment(message_id)}")

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every message, newest first. Filters: state, tag, campaign, to."""
        return self._list("/v1/messages", page_size, filters)


class Contacts(Resource):
    """/v1/contacts (scopes contacts:read, contacts:write)."""

    def upsert(self, email: str, **fields: Any) -> tuple[dict[str, Any], bool]:
        """Create the contact or update the one with this address → (contact, created).
        Fields: attributes (merged; a None value removes one), status, timezone, locale, source."""
        response = self._transport.request("POST", "/v1/contacts", json_body={"email": email, **fields})
        return response.json(), response.status_code == 201

    def get(self, email: str) -> dict[str, Any]:
        """The contact with this address, or with this numeric id (given as a string), with its lists."""
        return self._call("GET", f"/v1/contacts/{_segment(email)}")

    def update(self, email: str, **fields: Any) -> dict[str, Any]:
        """Change the fields given (attributes merge; `replace_attributes=True` replaces them)."""
        return self._call("PATCH", f"/v1/contacts/{_segment(email)}", json_body=fields)

    def delete(self, email: str) -> None:
        """Erase the contact; a suppression of its address is kept."""
        self._call("DELETE", f"/v1/contacts/{_segment(email)}")

    def batch(self, contacts: list[dict[str, Any]]) -> dict[str, Any]:
        """Upsert up to 10,000 → `{created, updated, rejected, results}`, a result per row in order."""
        return self._call("POST", "/v1/contacts/batch", json_body={"contacts": contacts})

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every contact. Filters: status, list."""
        return self._list("/v1/contacts", page_size, filters)


class Lists(Resource):
    """/v1/lists (scopes contacts:read, contacts:write)."""

    def create(self, name: str, description: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/v1/lists", json_body={"name": name, "description": description})

    def get(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/lists/{_segment(name)}")

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/v1/lists/{_segment(name)}")

    def list(self, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        return self._list("/v1/lists", page_size, {})

    def members(self, name: str, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """The list's contacts."""
        return self._list(f"/v1/lists/{_segment(name)}/members", page_size, {})

    def add_members(self, name: str, emails: Sequence[str]) -> int:
        """Subscribe these addresses to the list → how many were added."""
        added = self._call("POST", f"/v1/lists/{_segment(name)}/members", json_body={"emails": list(emails)})
        return int(added["added"])

    def remove_member(self, name: str, email: str) -> None:
        self._call("DELETE", f"/v1/lists/{_segment(name)}/members/{_segment(email)}")


class Imports(Resource):
    """/v1/imports (scopes contacts:write to start one, contacts:read to follow it)."""

    def create(self, file: str | os.PathLike[str] | IO[bytes], **options: Any) -> dict[str, Any]:
        """Upload a CSV or JSON Lines file (a path or an open binary file) → 202 the job. Options are the
        `smartmail contacts import` ones: list, mode, format, delimiter, encoding, batch_size, and the
        repeatable map (`{"E-Mail": "email"}`: column → target) and type (`{"age": "integer"}`)."""
        with ExitStack() as stack:
            if isinstance(file, str | os.PathLike):
                name = os.path.basename(os.fspath(file))
                stream: IO[bytes] = stack.enter_context(open(file, "rb"))
            else:
                name = os.path.basename(str(getattr(file, "name", "") or "upload"))
                stream = file
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            data = {key: _form_value(value) for key, value in options.items() if value is not None}
            return self._call("POST", "/v1/imports", data=data, files={"file": (name, stream, kind)})

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/imports/{_segment(job_id)}")

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        return self._list("/v1/imports", page_size, filters)

    def errors(self, job_id: str) -> str:
        """The rows the import rejected so far, as CSV text."""
        return self._transport.request("GET", f"/v1/imports/{_segment(job_id)}/errors").text


class Templates(Resource):
    """/v1/templates (scopes templates:read, templates:write)."""

    def create(
        self, name: str, subject: str, html: str, text: str | None = None, *, preheader: str | None = None
    ) -> dict[str, Any]:
        """Store a new version of the template → `{name, version, subject, html, text, preheader,
        created_at}`. `preheader`: hidden preview text (Jinja allowed)."""
        body: dict[str, Any] = {"name": name, "subject": subject, "html": html}
        if text is not None:
            body["text"] = text
        if preheader is not None:
            body["preheader"] = preheader
        return self._call("POST", "/v1/templates", json_body=body)

    def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The latest version, or the one asked for."""
        path = f"/v1/templates/{_segment(name)}"
        return self._call("GET", path if version is None else f"{path}/versions/{int(version)}")

    def list(self, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """The latest version of each template."""
        return self._list("/v1/templates", page_size, {})

    def preview(
        self, name: str, context: dict[str, Any] | None = None, *, version: int | None = None
    ) -> dict[str, Any]:
        """Render with this context → `{subject, html, text}`; nothing is sent."""
        body: dict[str, Any] = {"context": context or {}}
        if version is not None:
            body["version"] = version
        return self._call("POST", f"/v1/templates/{_segment(name)}/preview", json_body=body)

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/v1/templates/{_segment(name)}")


class Segments(Resource):
    """/v1/segments (scopes segments:read, segments:write)."""

    def save(self, name: str, rules: Any) -> dict[str, Any]:
        """Create the segment or replace its rules."""
        return self._call("PUT", f"/v1/segments/{_segment(name)}", json_body={"rules": rules})

    def get(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/segments/{_segment(name)}")

    def list(self, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        return self._list("/v1/segments", page_size, {})

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/v1/segments/{_segment(name)}")

    def count(self, name: str) -> int:
        return int(self._call("GET", f"/v1/segments/{_segment(name)}/count")["count"])

    def preview(self, name: str, *, limit: int | None = None) -> Sequence[dict[str, Any]]:
        """A sample of the segment's contacts."""
        return self._call("GET", f"/v1/segments/{_segment(name)}/preview", params={"limit": limit})["data"]


class Events(Resource):
    """/v1/events (scopes events:read, events:write)."""

    def send(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Record up to 1,000 events `{email, type, properties?, occurred_at?, id?}` (an `id` makes a
        resend a duplicate) → `{accepted, duplicates, rejected, results}`."""
        return self._call("POST", "/v1/events", json_body={"events": events})

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every event in the stream now, oldest first. Filters: after (a position), type (a name or a
        list of names), message, contact (an address), campaign (a name or id), include_machine."""
        return self._list("/v1/events", page_size, filters)

    def page(self, after: str | None = None, *, limit: int | None = None, **filters: Any) -> dict[str, Any]:
        """One page of the stream after a position → `{data, next_cursor, position}`: keep `position`
        as your checkpoint and pass it as `after` on the next call. Filters as for `list`."""
        return self._call("GET", "/v1/events", params={**filters, "after": after, "limit": limit})

    def of_message(self, message_id: str) -> Sequence[dict[str, Any]]:
        """One message's events, in the order they happened."""
        return self._call("GET", f"/v1/messages/{_segment(message_id)}/events")["data"]


class Suppressions(Resource):
    """/v1/suppressions (scopes suppressions:read, suppressions:write)."""

    def add(self, email: str, *, reason: str | None = None, detail: str | None = None) -> dict[str, Any]:
        body = {"email": email, "reason": reason, "detail": detail}
        return self._call("POST", "/v1/suppressions", json_body={k: v for k, v in body.items() if v is not None})

    def get(self, email: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/suppressions/{_segment(email)}")

    def delete(self, email: str) -> None:
        self._call("DELETE", f"/v1/suppressions/{_segment(email)}")

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every suppressed address. Filters: reason."""
        return self._list("/v1/suppressions", page_size, filters)


class Inbound(Resource):
    """/v1/inbound (scopes inbound:read, inbound:write): mail `smartmail inbound` received."""

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Inbound mail, newest first. Filters: state, verdict."""
        return self._list("/v1/inbound", page_size, filters)

    def get(self, inbound_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/inbound/{_segment(inbound_id)}")

    def raw(self, inbound_id: str) -> bytes:
        """The mail's bytes as received."""
        return self._transport.request("GET", f"/v1/inbound/{_segment(inbound_id)}/raw").content

    def retry(self, inbound_id: str) -> dict[str, Any]:
        """Process a failed mail again."""
        return self._call("POST", f"/v1/inbound/{_segment(inbound_id)}/retry")


class Campaigns(Resource):
    """/v1/campaigns (scopes campaigns:read, campaigns:write)."""

    def create(self, name: str, template: str, **settings: Any) -> dict[str, Any]:
        """A draft campaign (scheduled when send_at is given). Settings: lists, segment, from_, reply_to,
        send_at, window, window_timezone, rate_cap, tags, resend_unknown, tracking (default True),
        utm (`{"utm_source": …}`), preheader (replaces the template's), ab_test (`{"variants": [{"subject":
        …}, …], "test_share": 0.2, "metric": "opens", "duration": "4h", "auto_winner": True}`, docs/ab-tests.md)."""
        return self._call("POST", "/v1/campaigns", json_body={"name": name, "template": template, **_body(settings)})

    def get(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/campaigns/{_segment(name)}")

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every campaign. Filters: state."""
        return self._list("/v1/campaigns", page_size, filters)

    def update(self, name: str, **settings: Any) -> dict[str, Any]:
        """Change a draft or scheduled campaign (else Conflict)."""
        return self._call("PATCH", f"/v1/campaigns/{_segment(name)}", json_body=_body(settings))

    def schedule(self, name: str, send_at: datetime | str) -> dict[str, Any]:
        return self._call("POST", f"/v1/campaigns/{_segment(name)}/schedule", json_body={"send_at": send_at})

    def launch(self, name: str) -> dict[str, Any]:
        return self._act(name, "launch")

    def pause(self, name: str) -> dict[str, Any]:
        return self._act(name, "pause")

    def resume(self, name: str) -> dict[str, Any]:
        return self._act(name, "resume")

    def cancel(self, name: str) -> dict[str, Any]:
        return self._act(name, "cancel")

    def progress(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/campaigns/{_segment(name)}/progress")

    def engagement(self, name: str, *, include_machine: bool = False) -> dict[str, Any]:
        """Opens, clicks and rates (human hits only unless include_machine)."""
        path = f"/v1/campaigns/{_segment(name)}/engagement"
        return self._call("GET", path, params={"include_machine": True if include_machine else None})

    def ab_report(self, name: str) -> dict[str, Any]:
        """An A/B campaign's test: each variant's numbers and its z-test against the leader."""
        return self._call("GET", f"/v1/campaigns/{_segment(name)}/ab-report")

    def ab_winner(self, name: str, variant: str | None = None) -> dict[str, Any]:
        """Pick the A/B test's winner now (`variant`, or the leader); the report as picked."""
        body = {"variant": variant} if variant is not None else {}
        return self._call("POST", f"/v1/campaigns/{_segment(name)}/ab-winner", json_body=body)

    def _act(self, name: str, action: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/campaigns/{_segment(name)}/{action}")


class Keys(Resource):
    """/v1/keys (scope keys:manage)."""

    def create(
        self,
        name: str,
        scopes: list[str],
        *,
        expires_at: datetime | str | None = None,
        rate_limit: float | None = None,
        burst: int | None = None,
    ) -> dict[str, Any]:
        """A new API key (rate_limit in requests per second, burst back to back); its secret is in
        `"key"` of this answer only."""
        body = {"name": name, "scopes": scopes, "expires_at": expires_at, "rate_limit": rate_limit, "burst": burst}
        return self._call("POST", "/v1/keys", json_body={k: v for k, v in body.items() if v is not None})

    def get(self, key_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/keys/{_segment(key_id)}")

    def list(self, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every key. Filters: active (leave out revoked ones)."""
        return self._list("/v1/keys", page_size, filters)

    def revoke(self, key_id: str) -> dict[str, Any]:
        """Revoke the key at once → its record."""
        return self._call("DELETE", f"/v1/keys/{_segment(key_id)}")


class Webhooks(Resource):
    """/v1/webhooks (scope webhooks:manage): endpoints, their secrets, test sends, deliveries, replays."""

    def create(self, url: str, **fields: Any) -> dict[str, Any]:
        """Add an endpoint → it with its signing secret (`"secret"`, `whsec_…`). Fields: description,
        event_types, campaign_ids, tags, rate_limit, max_in_flight, batch_size."""
        return self._call("POST", "/v1/webhooks", json_body={"url": url, **fields})

    def get(self, endpoint_id: int) -> dict[str, Any]:
        """The endpoint with its deliveries per state (`"deliveries"`)."""
        return self._call("GET", f"/v1/webhooks/{int(endpoint_id)}")

    def list(self, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """Every endpoint, by id (never their secrets)."""
        return self._list("/v1/webhooks", page_size, {})

    def update(self, endpoint_id: int, **fields: Any) -> dict[str, Any]:
        """Change the fields given (as for create, and url); `enabled=False` (with `disabled_reason`)
        disables it, `enabled=True` enables it."""
        return self._call("PATCH", f"/v1/webhooks/{int(endpoint_id)}", json_body=fields)

    def delete(self, endpoint_id: int) -> None:
        """Remove the endpoint with its deliveries."""
        self._call("DELETE", f"/v1/webhooks/{int(endpoint_id)}")

    def secret(self, endpoint_id: int) -> str:
        """The endpoint's current signing secret."""
        return str(self._call("GET", f"/v1/webhooks/{int(endpoint_id)}/secret")["secret"])

    def rotate_secret(self, endpoint_id: int, overlap_seconds: float | None = None) -> dict[str, Any]:
        """A new signing secret → `{endpoint, secret}`; the current one also signs for `overlap_seconds`
        (default a day)."""
        body = None if overlap_seconds is None else {"overlap_seconds": overlap_seconds}
        return self._call("POST", f"/v1/webhooks/{int(endpoint_id)}/rotate-secret", json_body=body)

    def test(self, endpoint_id: int) -> dict[str, Any]:
        """Send a `webhook.test` event now → the delivery with its attempt (`attempt_log`)."""
        return self._call("POST", f"/v1/webhooks/{int(endpoint_id)}/test")

    def deliveries(self, endpoint_id: int, *, page_size: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """The endpoint's deliveries, newest first. Filters: state (pending, succeeded, failed)."""
        return self._list(f"/v1/webhooks/{int(endpoint_id)}/deliveries", page_size, filters)

    def delivery(self, endpoint_id: int, delivery_id: int) -> dict[str, Any]:
        """One delivery with its payload and every attempt (`attempt_log`)."""
        return self._call("GET", f"/v1/webhooks/{int(endpoint_id)}/deliveries/{int(delivery_id)}")

    def replay(self, endpoint_id: int, delivery_id: int) -> dict[str, Any]:
        """Send one delivery again (whatever its state) → the delivery."""
        return self._call("POST", f"/v1/webhooks/{int(endpoint_id)}/deliveries/{int(delivery_id)}/replay")

    def replay_range(
        self,
        endpoint_id: int,
        since: datetime | str,
        until: datetime | str | None = None,
        state: str | None = None,
    ) -> int:
        """Send again the deliveries created in [since, until) in `state` (failed by default; `"any"`:
        every one not pending) → how many."""
        body = {"since": since, "until": until, "state": state}
        path = f"/v1/webhooks/{int(endpoint_id)}/replay"
        replayed = self._call("POST", path, json_body={k: v for k, v in body.items() if v is not None})
        return int(replayed["replayed"])


class Workflows(Resource):
    """/v1/workflows (scopes workflows:read, workflows:write): automations, versioned."""

    def save(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Create the workflow or give it a new version when the definition differs → it with
        `version` and `changed` (False: the same definition was saved already)."""
        return self._call("PUT", f"/v1/workflows/{_segment(name)}", json_body=definition)

    def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The workflow with its current definition, or the given version's."""
        return self._call("GET", f"/v1/workflows/{_segment(name)}", params={"version": version})

    def list(self, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """Every workflow, by name."""
        return self._list("/v1/workflows", page_size, {})

    def pause(self, name: str) -> dict[str, Any]:
        """Enrol nobody and hold its enrolments → `{name, state, version, enrolments}` (how many held)."""
        return self._call("POST", f"/v1/workflows/{_segment(name)}/pause")

    def resume(self, name: str) -> dict[str, Any]:
        """Enrol again and let held enrolments go on → `{…, enrolments}` (how many)."""
        return self._call("POST", f"/v1/workflows/{_segment(name)}/resume")

    def move(self, name: str, from_version: int | None = None) -> dict[str, Any]:
        """Move running enrolments of older versions (or of `from_version`) to the current one → `{…, enrolments}`."""
        body = None if from_version is None else {"from_version": from_version}
        return self._call("POST", f"/v1/workflows/{_segment(name)}/move", json_body=body)

    def enrol(self, name: str, email: str, properties: dict[str, Any] | None = None) -> bool:
        """Enrol a stored contact under the entry rule → whether it was enrolled."""
        body = {"email": email, "properties": properties}
        return bool(self._call("POST", f"/v1/workflows/{_segment(name)}/enrolments", json_body=body)["enrolled"])

    def status(self, name: str) -> dict[str, Any]:
        """`{enrolled, running: {step: {state: n}}, ended: {reason: n}, steps: {step: {runs, emails}},
        conversions, conversion_rate}`."""
        return self._call("GET", f"/v1/workflows/{_segment(name)}/status")

    def simulate(
        self, name: str, email: str, *, assume: Sequence[str] = (), start: datetime | str | None = None
    ) -> Sequence[dict[str, Any]]:
        """The path the contact would take, `[{at, step, type, does}]`; nothing is sent. `assume`:
        `opened`, `clicked` or event types that happen on the way."""
        body = {"email": email, "assume": list(assume), "start": start}
        path = f"/v1/workflows/{_segment(name)}/simulate"
        return self._call("POST", path, json_body={k: v for k, v in body.items() if v is not None})["data"]


class Analytics(Resource):
    """/v1/analytics (scope analytics:read): KPIs and trends from the roll-ups."""

    def campaign(self, name: str) -> dict[str, Any]:
        """A campaign's KPIs → `{campaign, counts, kpis: {name: {value, numerator, denominator, …}}}`."""
        return self._call("GET", f"/v1/analytics/campaigns/{_segment(name)}")

    def trends(
        self,
        *,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        granularity: str | None = None,
        campaign: str | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Counters and KPIs per hour or day → `{campaign, tag, granularity, since, until, counts, kpis, series}`."""
        iso = lambda moment: moment.isoformat() if isinstance(moment, datetime) else moment  # naive: UTC
        params = {
            "since": iso(since),
            "until": iso(until),
            "granularity": granularity,
            "campaign": campaign,
            "tag": tag,
        }
        return self._call("GET", "/v1/analytics/trends", params=params)
