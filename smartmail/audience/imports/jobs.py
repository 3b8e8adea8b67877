"""Import jobs: created and queued, run or resumed from their checkpoint batch by batch, status and error report."""

from __future__ import annotations

import collections
import csv
import io
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import structlog
from sqlalchemy import and_, or_, select, update

from smartmail.audience.contacts import InvalidInput
from smartmail.audience.exports import safe_cell
from smartmail.audience.imports.options import (
    ImportOptions,
    Record,
    RowError,
    check_options,
)
from smartmail.audience.imports.readers import check_header, read_csv, read_jsonl
from smartmail.audience.imports.writer import JobGone, commit_batch
from smartmail.config import get_settings
from smartmail.store.engine import get_engine, reader, session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import ContactList, ImportJob, ImportRowError
from smartmail.store.sql.contact_rows import for_bind
from smartmail.workers.dispatch import publish

log = structlog.get_logger("smartmail.imports")

JOB_STATES = ("pending", "running", "done", "failed")
Batch = tuple[list[Record], list[tuple[int, RowError]], int, int]  # records, errors, last row, bytes read
_DONE = object()


def create_job(path: str | os.PathLike, **options: Any) -> str:
    """Check the file and options (InvalidInput naming the option) and store a pending job; returns its id."""
    known = set(ImportOptions.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise InvalidInput(f"unknown option(s) {', '.join(sorted(unknown))}", field="options")
    resolved = Path(path).resolve()
    opts = check_header(resolved, check_options(resolved, ImportOptions(**options)))
    with session_scope() as session:
        list_id = None
        if opts.list is not None:
            list_id = session.scalar(select(ContactList.id).where(ContactList.name == opts.list))
            if list_id is None:
                raise InvalidInput(f"no list named {opts.list!r}", field="list")
        job = ImportJob(
            id=new_id(),
            state="pending",
            path=str(resolved),
            options=opts.__dict__.copy(),
            list_id=list_id,
            total_bytes=resolved.stat().st_size,
            created_at=utcnow(),
        )
        session.add(job)
        return job.id


def start_import(path: str | os.PathLike, **options: Any) -> str:
    """Create an import job and queue it on the `imports` queue (after the commit); returns the job id."""
    job_id = create_job(path, **options)
    enqueue(job_id)
    return job_id


def enqueue(job_id: str) -> None:
    publish("smartmail.imports.run", job_id)


def discard_job(job_id: str) -> None:
    """Delete a job that could not be queued (so no worker has it), and its file if it was uploaded."""
    with session_scope() as session:
        job = session.get(ImportJob, job_id)
        if job is None or job.state != "pending":
            return
        path, uploaded = Path(job.path), job.options.get("upload_name") is not None
        session.delete(job)
    if uploaded:
        path.unlink(missing_ok=True)


def _batches(path: Path, options: ImportOptions, checkpoint: int) -> Iterator[Batch]:
    """The rows after the checkpoint in batches of options.batch_size (good and bad rows counted).
    A repeated address is reported here, naming its first row wherever that is in the file: the
    reader keeps each address's first row (a resumed run reads them from the rows before its
    checkpoint): one dict entry per distinct address, so a file of a few million rows fits."""
    read = read_jsonl if options.format == "jsonl" else read_csv
    records: list[Record] = []
    errors: list[tuple[int, RowError]] = []
    first_row: dict[str, int] = {}
    last_row, tell = checkpoint, (lambda: 0)
    for row_no, item, tell in read(path, options):
        if isinstance(item, Record):
            first = first_row.setdefault(item.email, row_no)
            if first != row_no and row_no > checkpoint:
                item = RowError("email", f"duplicate of row {first}", item.email)
        if row_no <= checkpoint:
            continue
        last_row = row_no
        if isinstance(item, RowError):
            errors.append((row_no, item))
        else:
            records.append(item)
        if len(records) + len(errors) >= options.batch_size:
            yield records, errors, last_row, tell()
            records, errors = [], []
    if records or errors or last_row != checkpoint:
        yield records, errors, last_row, path.stat().st_size  # the reader has closed the file: all read


def _read_ahead(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Parse the next batches in a thread while this one is written: the database driver releases
    the GIL while it waits for the server, so parsing and writing overlap. At most `depth` batches
    wait, so memory stays bounded."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        handoff.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            handoff.put(exc)

    thread = threading.Thread(target=produce, name="smartmail-import-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                handoff.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.05)


def run_job(job_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) an import job: rows up to the job's checkpoint are skipped, each batch is
    committed together with its errors and the new checkpoint, so a run killed midway resumes
    without duplicates and without losing or repeating error rows."""
    with session_scope() as session:
        job = session.get(ImportJob, job_id)
        if job is None:
            raise InvalidInput(f"no import job {job_id}", field="job_id")
        finished = job.state == "done"
        if not finished:
            job.state, job.error = "running", None
        job.started_at = job.started_at or utcnow()
        options = ImportOptions(**job.options)
        path, list_id, checkpoint = Path(job.path), job.list_id, job.rows_done
    if finished:
        return job_status(job_id)
    log.info("import.started", job_id=job_id, path=str(path), resume_after_row=checkpoint)
    try:
        _write_in_order(
            job_id, _read_ahead(_batches(path, options, checkpoint)), checkpoint, options, list_id, on_progress
        )
    except JobGone:
        log.warning("import.superseded", job_id=job_id)
        return job_status(job_id)
    except Exception as exc:
        with session_scope() as session:
            session.execute(
                update(ImportJob)
                .where(ImportJob.id == job_id)
                .values(state="failed", error=f"{type(exc).__name__}: {exc}")
            )
        log.error("import.failed", job_id=job_id, error=str(exc))
        raise
    with session_scope() as session:
        job = session.get(ImportJob, job_id)
        assert job is not None  # this run holds the job's checkpoint
        job.state, job.finished_at, job.bytes_read = "done", utcnow(), job.total_bytes
    if options.upload_name is not None:
        # An uploaded file is ours, needed no more once every row is in. A failed job keeps its file:
        # it resumes from its checkpoint (a retried task, `smartmail contacts import-resume`).
        path.unlink(missing_ok=True)
    status = job_status(job_id)
    log.info("import.done", **{k: status[k] for k in ("job_id", "created", "updated", "skipped", "failed")})
    if on_progress:
        on_progress(status)
    return status


def _write_in_order(
    job_id: str,
    batches: Iterator[Batch],
    checkpoint: int,
    options: ImportOptions,
    list_id: int | None,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Commit the batches in file order. Where the store allows concurrent batches (PostgreSQL),
    SMARTMAIL_IMPORT_WRITERS batches are written at once, each on its own connection: one server
    process alone is the bottleneck of an import there, and other cores would idle. Order and the
    checkpoint still hold: a batch moves the job's checkpoint from where the previous batch leaves
    it, and only once that batch has committed, so it commits after it, or finds the checkpoint
    unmoved (JobGone) if that batch failed. A batch cannot see the rows of the batches being
    written beside it; addresses repeated between them are already reported by `_batches`."""
    writers = get_settings().import_writers
    if writers == 1 or not for_bind(get_engine()).concurrent_batches:
        for records, errors, last_row, position in batches:
            checkpoint = commit_batch(job_id, checkpoint, last_row, position, records, errors, options, list_id)
            if on_progress:
                on_progress(job_status(job_id))
        return
    in_flight: collections.deque[Future] = collections.deque()
    committed = threading.Event()  # the previous batch's transaction has ended
    committed.set()

    def write(batch: Batch, checkpoint: int, after: threading.Event, done: threading.Event) -> int:
        records, errors, last_row, position = batch
        try:
            return commit_batch(job_id, checkpoint, last_row, position, records, errors, options, list_id, after=after)
        finally:
            done.set()

    def finish_oldest() -> None:
        in_flight.popleft().result()
        if on_progress:
            on_progress(job_status(job_id))

    with ThreadPoolExecutor(writers, thread_name_prefix="smartmail-import-writer") as pool:
        for records, errors, last_row, position in batches:
            if len(in_flight) == writers:
                finish_oldest()
            after, committed = committed, threading.Event()
            in_flight.append(pool.submit(write, (records, errors, last_row, position), checkpoint, after, committed))
            checkpoint = last_row
        while in_flight:
            finish_oldest()


def _status(job: ImportJob) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "state": job.state,
        "path": job.path,
        "options": job.options,
        "total_bytes": job.total_bytes,
        "bytes_read": job.bytes_read,
        "rows_done": job.rows_done,
        "created": job.created,
        "updated": job.updated,
        "skipped": job.skipped,
        "failed": job.failed,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def find_job(job_id: str) -> dict[str, Any] | None:
    """The job as job_status() gives it, or None when there is no such job."""
    with session_scope() as session:
        job = session.get(ImportJob, job_id)
        return None if job is None else _status(job)


def job_status(job_id: str) -> dict[str, Any]:
    found = find_job(job_id)
    if found is None:
        raise InvalidInput(f"no import job {job_id}", field="job_id")
    return found


def list_jobs(limit: int = 20, state: str | None = None, before: str | None = None) -> list[dict[str, Any]]:
    """The newest import jobs first, as job_status() gives them; `before` (a job id) pages on: the
    jobs after that one in this order."""
    if state is not None and state not in JOB_STATES:
        raise InvalidInput(f"{state!r} is not one of {', '.join(JOB_STATES)}", field="state")
    query = select(ImportJob).order_by(ImportJob.created_at.desc(), ImportJob.id.desc()).limit(limit)
    if state is not None:
        query = query.where(ImportJob.state == state)
    if before is not None:
        # Keyset on (created_at, id), the order itself; an unknown id compares with NULL: no rows.
        last = select(ImportJob.created_at).where(ImportJob.id == before).scalar_subquery()
        query = query.where(or_(ImportJob.created_at < last, and_(ImportJob.created_at == last, ImportJob.id < before)))
    with session_scope() as session:
        return [_status(job) for job in session.scalars(query)]


def _report_chunks(job_id: str, rows_per_chunk: int) -> Iterator[tuple[str, int]]:
    """(CSV text, bad rows in it): the header, then the rows in chunks as the database hands them over."""
    buffer = io.StringIO()
    report = csv.writer(buffer)
    report.writerow(["row", "field", "reason", "value"])
    with reader() as connection:
        table = ImportRowError.__table__
        result = connection.execution_options(yield_per=rows_per_chunk).execute(
            select(table.c.row, table.c.field, table.c.reason, table.c.value)
            .where(table.c.job_id == job_id)
            .order_by(table.c.row)
        )
        for rows in result.partitions():
            for row, field_name, reason, value in rows:
                report.writerow([row, safe_cell(field_name), safe_cell(reason), safe_cell(value or "")])
            yield buffer.getvalue(), len(rows)
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue(), 0  # the header of a report without rows


def error_report(job_id: str, rows_per_chunk: int = 5000) -> Iterator[str]:
    """The job's bad rows as CSV text (row, field, reason, value) in row order, read from the database
    while it is sent, in chunks. Values are neutralized like exports, since the report is meant to
    be opened in a spreadsheet."""
    for text, _ in _report_chunks(job_id, rows_per_chunk):
        yield text


def write_error_report(job_id: str, out: TextIO) -> int:
    """The job's error report (see error_report) written to `out`; returns how many bad rows it lists."""
    count = 0
    for text, rows in _report_chunks(job_id, 5000):
        out.write(text)
        count += rows
    return count
