"""/v1/imports: a CSV or JSON Lines upload, streamed to disk, as an import job; the jobs and their error reports."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, HTTPException, Query, Request, Response, Security
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from kombu.exceptions import KombuError
from pydantic import BaseModel
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from smartmail.access.keys import Principal
from smartmail.audience import imports
from smartmail.config import get_settings
from smartmail.errors import InvalidInput
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page
from smartmail.web.problems import problem

log = structlog.get_logger("smartmail.web")

router = APIRouter(prefix="/imports", tags=["imports"])

FILE_FIELD = "file"
# The form fields, as the `smartmail contacts import` options: a value each, or repeatable.
SINGLE_FIELDS = ("list", "mode", "format", "delimiter", "encoding", "batch_size")
REPEATABLE_FIELDS = ("map", "type")
MAX_FIELD_BYTES = 16 * 1024
MAX_FIELD_PARTS = 1000
# Data is handed to a thread to be written once this much has arrived, not per network read.
WRITE_AT_BYTES = 256 * 1024
_FORMAT_OF_TYPE = {
    "text/csv": "csv",
    "text/tab-separated-values": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
}
# The domain names options as ImportOptions does; the form as the CLI does.
_FORM_NAME = {"mapping": "map", "types": "type", "path": "file", "header": "file", "upload_name": "file"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UploadRefused(Exception):
    """The request cannot be read as an upload: `status` (400, 413, 415) and a detail."""

    def __init__(self, status: int, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extensions = status, detail, extensions


@dataclass
class Upload:
    """A received upload: the file under its final name, the name the client gave it, the form fields."""

    path: Path
    filename: str
    content_type: str
    fields: dict[str, list[str]] = field(default_factory=dict)


class _Parts:
    """The multipart parser's callbacks: the file part's data queued for the disk, other parts kept as
    (small, UTF-8) field values, a form field that is not one of ours refused at its headers."""

    def __init__(self) -> None:
        self.fields: dict[str, list[str]] = {}
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.file_seen = False
        self.filename = ""
        self.content_type = ""
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._name: list[bytes] = []
        self._value: list[bytes] = []
        self._part: str | None = None  # the current part's form field name
        self._in_file = False
        self._data = bytearray()
        self._parts = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._name.append(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.append(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def take(self) -> list[bytes]:
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        return pending

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_FIELD_PARTS:
            raise UploadRefused(400, f"The form has more than {MAX_FIELD_PARTS} parts.")
        self._headers, self._part, self._in_file = {}, None, False
        self._data = bytearray()

    def _header_end(self) -> None:
        self._headers[b"".join(self._name).strip().lower()] = b"".join(self._value).strip()
        self._name, self._value = [], []

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in params:
            raise UploadRefused(400, "A part of the form has no Content-Disposition name (RFC 7578 section 4.2).")
        name = _text(params[b"name"])
        if name == FILE_FIELD:
            if self.file_seen:
                raise InvalidInput("only one file may be sent", field=FILE_FIELD)
            self.file_seen = self._in_file = True
            self.filename = _file_name(params.get(b"filename", b""))
            content_type = parse_options_header(self._headers.get(b"content-type"))[0]
            self.content_type = content_type.decode("latin-1")
        elif name not in SINGLE_FIELDS and name not in REPEATABLE_FIELDS:
            raise InvalidInput(
                f"is not a field of this form (file, {', '.join(SINGLE_FIELDS + REPEATABLE_FIELDS)})", field=name
            )
        elif name in SINGLE_FIELDS and name in self.fields:
            raise InvalidInput("is given more than once", field=name)
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
            return
        self._data += data[start:end]
        if len(self._data) > MAX_FIELD_BYTES:
            raise InvalidInput(f"is longer than {MAX_FIELD_BYTES} bytes", field=self._part or "")

    def _part_end(self) -> None:
        if self._part is None or self._in_file:
            return
        try:
            value = self._data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("is not UTF-8 text", field=self._part) from None
        self.fields.setdefault(self._part, []).append(value)

    def _end(self) -> None:
        self.ended = True


def _text(value: bytes) -> str:
    # Header values arrive as latin-1 (python-multipart's reading); clients send names in UTF-8.
    return value.decode("latin-1").encode("latin-1").decode("utf-8", errors="replace")


def _file_name(value: bytes) -> str:
    """The client's file name without any directory part or control characters (it is shown back)."""
    name = re.split(r"[\\/]", _text(value))[-1]
    return _CONTROL.sub("", name).strip()[:255]


async def receive_upload(chunks: AsyncIterator[bytes], content_type: str, directory: Path, max_bytes: int) -> Upload:
    """Stream a multipart/form-data body to a file in `directory`: written in chunks to a temporary
    file, renamed once the whole body has arrived and parsed, removed on any failure. Never more
    than `max_bytes` of body is read (UploadRefused 413); a form field that is not ours, a second
    file or an oversized field value stops the read at once (InvalidInput naming the field)."""
    media_type, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(415, "Content-Type: send multipart/form-data (RFC 7578) with a part named file.")
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, callbacks=parts.callbacks())  # type: ignore[arg-type]
    except FormParserError as exc:
        raise UploadRefused(400, f"Content-Type: {exc}") from None
    await run_in_threadpool(directory.mkdir, parents=True, exist_ok=True)
    descriptor, temporary = await run_in_threadpool(tempfile.mkstemp, dir=directory, prefix=".upload-", suffix=".part")
    temporary_path = Path(temporary)
    out = os.fdopen(descriptor, "wb")
    try:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise UploadRefused(413, f"The upload is larger than {max_bytes} bytes.", max_bytes=max_bytes)
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise UploadRefused(400, f"The body is not valid multipart/form-data: {exc}") from None
            if parts.pending_bytes >= WRITE_AT_BYTES:
                await run_in_threadpool(out.writelines, parts.take())
        if not parts.ended:
            raise UploadRefused(400, "The body ends before the multipart closing boundary.")
        await run_in_threadpool(out.writelines, parts.take())
        await run_in_threadpool(out.close)
        if not parts.file_seen:
            raise InvalidInput("is required: the CSV or JSON Lines file to import", field=FILE_FIELD)
        final = directory / f"{uuid.uuid4().hex}.upload"
        await run_in_threadpool(os.replace, temporary_path, final)
    except BaseException:
        # Synchronous, a single unlink: an await here would not run in a cancelled task.
        out.close()
        temporary_path.unlink(missing_ok=True)
        raise
    return Upload(final, parts.filename, parts.content_type, parts.fields)


def job_options(upload: Upload) -> dict[str, Any]:
    """The import options the form gives (as `smartmail contacts import` takes them); InvalidInput
    naming the form field. A field sent empty counts as not sent, as an HTML form sends blank inputs."""
    given = {name: [v for v in values if v != ""] for name, values in upload.fields.items()}
    options: dict[str, Any] = {name: given[name][0] for name in SINGLE_FIELDS if given.get(name)}
    if "batch_size" in options:
        text = options["batch_size"].strip()
        if not text.isascii() or not text.isdigit() or len(text) > 6:
            raise InvalidInput("must be an integer from 1 to 50000", field="batch_size")
        options["batch_size"] = int(text)
    options["mapping"] = imports.parse_pairs(given.get("map", []), "map")
    options["types"] = imports.parse_pairs(given.get("type", []), "type")
    if "format" not in options:
        found = imports.format_from_name(upload.filename) or _FORMAT_OF_TYPE.get(upload.content_type)
        if found is None:
            raise InvalidInput(
                f"cannot tell the format from the file name {upload.filename!r}: give csv or jsonl", field="format"
            )
        options["format"] = found
    options["upload_name"] = upload.filename or "upload"
    return options


def _form_field(exc: InvalidInput) -> InvalidInput:
    """The domain's error naming the form field the option came from (`mapping.E-Mail` → `map.E-Mail`)."""
    head, dot, rest = exc.field.partition(".")
    return InvalidInput(exc.reason, field=_FORM_NAME.get(head, head) + dot + rest)


class JobOptions(BaseModel):
    format: str
    mode: str
    list: str | None = None
    mapping: dict[str, str]
    types: dict[str, str]
    delimiter: str | None = None
    encoding: str | None = None
    batch_size: int


class ImportJobOut(BaseModel):
    id: str
    state: Literal["pending", "running", "done", "failed"]
    filename: str
    options: JobOptions
    total_bytes: int
    bytes_read: int
    rows_done: int
    created: int
    updated: int
    skipped: int
    failed: int
    error: str | None = None
    created_at: UtcDateTime
    started_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None


def _job_out(job: dict[str, Any]) -> ImportJobOut:
    options = job["options"]
    return ImportJobOut(
        **{k: v for k, v in job.items() if k not in ("job_id", "path", "options")},
        id=job["job_id"],
        filename=options.get("upload_name") or Path(job["path"]).name,
        options=JobOptions(**{name: options.get(name) for name in JobOptions.model_fields}),
    )


_FORM_SCHEMA = {
    "type": "object",
    "required": [FILE_FIELD],
    "properties": {
        FILE_FIELD: {"type": "string", "format": "binary", "description": "CSV (header row) or JSON Lines."},
        "list": {"type": "string", "description": "Join every imported contact to this list."},
        "mode": {"type": "string", "enum": list(imports.MODES), "default": "upsert"},
        "format": {"type": "string", "enum": list(imports.FORMATS), "description": "Default: from the file name."},
        "map": {
            "type": "array",
            "items": {"type": "string"},
            "description": "COLUMN=TARGET: email, status, timezone, locale, ignore or an attribute name.",
        },
        "type": {
            "type": "array",
            "items": {"type": "string"},
            "description": f"ATTRIBUTE=TYPE: {', '.join(imports.TYPES)}.",
        },
        "delimiter": {"type": "string", "description": "CSV delimiter (default: detected)."},
        "encoding": {"type": "string", "description": "CSV encoding (default: detected)."},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 50000, "default": 5000},
    },
}


@router.post(
    "",
    status_code=202,
    response_model=ImportJobOut,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM_SCHEMA}}}},
    responses={
        status: {"description": description, "content": {"application/problem+json": {}}}
        for status, description in (
            (400, "The body is not a complete multipart/form-data body."),
            (413, "The upload is larger than SMARTMAIL_API_MAX_UPLOAD_BYTES (`max_bytes`)."),
            (415, "The body is not multipart/form-data."),
            (422, "A form field is missing or not valid; `errors` names it (`/list`)."),
            (503, "The imports queue is not reachable; nothing was stored."),
        )
    },
)
async def create_import(
    request: Request,
    response: Response,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> Any:
    """Upload a CSV or JSON Lines file as an import job: 202 with the job, which a worker of the
    `imports` queue runs (`GET /v1/imports/{id}` for its progress). The form fields are the options
    of `smartmail contacts import`; the file is streamed to disk, never held in memory."""
    settings = get_settings()
    max_bytes = settings.api_max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > max_bytes:
        return problem(413, f"The upload is larger than {max_bytes} bytes.", max_bytes=max_bytes)
    try:
        upload = await receive_upload(
            request.stream(), request.headers.get("content-type", ""), settings.api_upload_dir, max_bytes
        )
    except UploadRefused as exc:
        return problem(exc.status, exc.detail, **exc.extensions)
    except ClientDisconnect:
        return problem(400, "The client went away before the upload ended.")
    try:
        options = job_options(upload)
        job_id = await run_in_threadpool(imports.create_job, upload.path, **options)
    except InvalidInput as exc:
        upload.path.unlink(missing_ok=True)
        raise _form_field(exc) from None
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    try:
        await run_in_threadpool(imports.enqueue, job_id)
    except (RedisError, KombuError, OSError) as exc:
        # Nothing is left half-done: without a queue no worker would ever take the job.
        log.warning("api.import_not_queued", job_id=job_id, error=str(exc))
        await run_in_threadpool(imports.discard_job, job_id)
        return problem(503, "The imports queue is not reachable; nothing was stored, retry later.")
    response.headers["Location"] = f"/v1/imports/{job_id}"
    return _job_out(await run_in_threadpool(imports.job_status, job_id))


JobId = Annotated[str, PathParam(max_length=26)]


def _found(job_id: str) -> dict[str, Any]:
    job = imports.find_job(job_id)
    if job is None:
        raise HTTPException(404, f"No import job {job_id!r}.")
    return job


@router.get("/{job_id}", response_model=ImportJobOut)
def get_import(
    job_id: JobId, principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])]
) -> ImportJobOut:
    """One import job: its state, bytes and rows done, and the counts of created, updated, skipped and bad rows."""
    return _job_out(_found(job_id))


@router.get("/{job_id}/errors", response_class=StreamingResponse, responses={200: {"content": {"text/csv": {}}}})
def get_import_errors(
    job_id: JobId, principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])]
) -> StreamingResponse:
    """The job's bad rows as CSV (row, field, reason, value), streamed; the rows reported so far while it runs."""
    _found(job_id)
    return StreamingResponse(
        imports.error_report(job_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="import-{job_id}-errors.csv"'},
    )


@router.get("", response_model=Page[ImportJobOut])
def list_imports(
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])],
    limit: Limit = 100,
    cursor: Cursor = None,
    state: Annotated[
        Literal["pending", "running", "done", "failed"] | None, Query(description="Only jobs in this state.")
    ] = None,
) -> Page[ImportJobOut]:
    """Import jobs, newest first."""
    position = decode_cursor(cursor, (str,))
    jobs = imports.list_jobs(limit + 1, state, before=position[0] if position else None)
    return page([_job_out(job) for job in jobs], limit, lambda job: [job.id])
