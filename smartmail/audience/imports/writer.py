"""Import batches written: duplicates, mode and suppressions applied, one upsert, row errors, the checkpoint."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import update
from sqlalchemy.engine import Connection

from smartmail.audience import contacts
from smartmail.audience.imports.options import ImportOptions, Record, RowError
from smartmail.store.engine import get_engine
from smartmail.store.models import ImportJob, ImportRowError
from smartmail.store.sql.contact_rows import for_bind
from smartmail.workers import metrics

_MAX_VALUE_IN_REPORT = 200

_json_fallback = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode


class JobGone(Exception):
    """Another run of the same job moved its checkpoint: this run stops."""


@dataclass
class BatchResult:
    created: int = 0
    updated: int = 0
    skipped: int = 0
    errors: list[tuple[int, RowError]] = field(default_factory=list)


def _to_json(attributes: dict[str, Any]) -> str:
    """orjson: several times faster than the standard library's encoder, a sizeable share of an
    import's Python time. Integers beyond 64 bits are left to the standard library. Non-finite
    numbers, which orjson would write as null, never get here: the readers refuse them."""
    try:
        return orjson.dumps(attributes).decode()
    except orjson.JSONEncodeError:
        return _json_fallback(attributes)


def _clip(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # Undecodable bytes (kept as surrogates by the reader) shown as \xNN.
    text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    return text[:_MAX_VALUE_IN_REPORT]


def write_batch(
    connection: Connection, job_id: str, records: list[Record], options: ImportOptions, list_id: int | None
) -> BatchResult:
    """Write one batch in the caller's transaction: in-file duplicates found, mode applied, one upsert,
    list memberships joined, suppressed addresses kept suppressed."""
    result = BatchResult()
    first_row: dict[str, int] = {}
    unique: list[Record] = []
    for record in records:
        if record.email in first_row:
            result.errors.append(
                (record.row, RowError("email", f"duplicate of row {first_row[record.email]}", record.email))
            )
        else:
            first_row[record.email] = record.row
            unique.append(record)
    if not unique:
        return result
    store = for_bind(connection)
    known, suppressed = store.known([r.email for r in unique])
    rows: list[tuple] = []
    new_suppressions: list[tuple[str, str]] = []
    for record in unique:
        mark, current = known.get(record.email, (None, None))
        if mark == job_id:  # written earlier in this file: a duplicate row
            result.errors.append(
                (record.row, RowError("email", "duplicate of an earlier row in this file", record.email))
            )
            continue
        exists = current is not None
        if options.mode == "update" and not exists:
            result.skipped += 1
            continue
        if options.mode == "create" and exists:
            result.skipped += 1
        elif exists:
            result.updated += 1
        else:
            result.created += 1
        # A bulk import never resubscribes an address that bounced, complained or unsubscribed.
        reason = suppressed.get(record.email)
        status = contacts.bulk_status(record.status, current, reason)
        if not reason and record.status in contacts.STATUS_TO_SUPPRESSION and not (options.mode == "create" and exists):
            new_suppressions.append((record.email, contacts.STATUS_TO_SUPPRESSION[record.status]))
        rows.append((record.email, status, record.timezone, record.locale, _to_json(record.attributes)))
    if rows:
        store.upsert(
            rows,
            job_id=job_id,
            source=options.source,
            create_only=options.mode == "create",
            list_id=list_id,
            all_new=not known,
        )
        if new_suppressions:
            store.suppress(new_suppressions)
    return result


def commit_batch(
    job_id: str,
    checkpoint: int,
    last_row: int,
    position: int,
    records: list[Record],
    errors: list[tuple[int, RowError]],
    options: ImportOptions,
    list_id: int | None,
    after: threading.Event | None = None,
) -> int:
    """Write a batch, its row errors and the job's new checkpoint in one transaction; the new checkpoint."""
    with get_engine().begin() as connection:
        for_bind(connection).begin_batch()
        result = write_batch(connection, job_id, records, options, list_id) if records else BatchResult()
        all_errors = errors + result.errors
        if all_errors:
            connection.execute(
                ImportRowError.__table__.insert(),
                [
                    {
                        "job_id": job_id,
                        "row": row,
                        "field": error.field[:200],
                        "reason": error.reason,
                        "value": _clip(error.value),
                    }
                    for row, error in all_errors
                ],
            )
        # The checkpoint moves only from where this run found it: a second run of the same job
        # (a redelivered task) cannot commit the same rows twice.
        if after is not None:
            after.wait()  # the batch before has committed (or failed: then the checkpoint has not moved)
        moved = connection.execute(
            update(ImportJob)
            .where(ImportJob.id == job_id, ImportJob.rows_done == checkpoint)
            .values(
                rows_done=last_row,
                bytes_read=position,
                created=ImportJob.created + result.created,
                updated=ImportJob.updated + result.updated,
                skipped=ImportJob.skipped + result.skipped,
                failed=ImportJob.failed + len(all_errors),
            )
        )
        if moved.rowcount != 1:
            raise JobGone(job_id)
    metrics.count_import_rows(result.created, result.updated, result.skipped, len(all_errors))
    return last_row
