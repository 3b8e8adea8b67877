"""Bulk contact import: streamed CSV / JSON Lines readers, one upsert per batch, progress and a row error report."""

from smartmail.audience.imports.jobs import (
    JOB_STATES,
    create_job,
    enqueue,
    job_status,
    list_jobs,
    run_job,
    start_import,
    write_error_report,
)
from smartmail.audience.imports.options import (
    FIELDS,
    FORMATS,
    IGNORE,
    MODES,
    TYPES,
    ImportOptions,
    Record,
    RowError,
    check_options,
    convert,
)
from smartmail.audience.imports.readers import check_header, read_csv, read_jsonl
from smartmail.audience.imports.writer import BatchResult, JobGone

__all__ = [
    "FIELDS",
    "FORMATS",
    "IGNORE",
    "JOB_STATES",
    "MODES",
    "TYPES",
    "BatchResult",
    "ImportOptions",
    "JobGone",
    "Record",
    "RowError",
    "check_header",
    "check_options",
    "convert",
    "create_job",
    "enqueue",
    "job_status",
    "list_jobs",
    "read_csv",
    "read_jsonl",
    "run_job",
    "start_import",
    "write_error_report",
]
