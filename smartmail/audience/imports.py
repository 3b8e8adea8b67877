"""Bulk contact import: a streamed CSV / JSON Lines reader, one upsert per batch, progress and a row error report."""
from __future__ import annotations

import codecs
import collections
import csv
import io
import json
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
import structlog
from charset_normalizer import from_bytes
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from smartmail.audience import contacts
from smartmail.config import get_settings
from smartmail.audience.contacts import InvalidInput, check_attribute_name
from smartmail.store.engine import COPY_SPECIAL, get_engine, insert_else_upsert, reader, session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import ContactList, ImportJob, ImportRowError
from smartmail.workers.dispatch import publish

log = structlog.get_logger("smartmail.imports")

MODES = ("upsert", "create", "update")
FORMATS = ("csv", "jsonl")
TYPES = ("string", "number", "integer", "boolean", "date", "datetime", "json")
FIELDS = ("email", "status", "timezone", "locale")
IGNORE = "ignore"
# Header names understood without a mapping (compared lower-cased, spaces and dashes as _).
_DEFAULT_FIELDS = {"email": "email", "e_mail": "email", "email_address": "email", "mail": "email",
                   "status": "status", "timezone": "timezone", "time_zone": "timezone", "tz": "timezone",
                   "locale": "locale", "language": "locale"}
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes the codec could not decode (errors="surrogateescape")
_TRUE = frozenset({"true", "yes", "y", "t", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "f", "0", "off"})
_INT = re.compile(r"[+-]?\d+")
_SAMPLE = 64 * 1024
_MAX_VALUE_IN_REPORT = 200
_SQLITE_CACHE_KB = 128 * 1024


@dataclass
class ImportOptions:
    """What `start_import` / `create_job` accept; stored with the job so a re-run reads the file the same way."""

    format: str | None = None          # csv | jsonl; from the file name when None
    mode: str = "upsert"               # upsert | create (new addresses only) | update (known addresses only)
    list: str | None = None            # join every imported contact to this list
    mapping: dict[str, str] = field(default_factory=dict)  # column -> email|status|timezone|locale|ignore|<attribute>
    types: dict[str, str] = field(default_factory=dict)    # attribute -> string|number|integer|boolean|date|…
    delimiter: str | None = None       # CSV; sniffed when None
    encoding: str | None = None        # CSV; detected when None (a UTF-8 BOM always wins)
    batch_size: int = 5000
    source: str = "import"


class RowError(Exception):
    def __init__(self, field: str, reason: str, value: Any = None) -> None:
        super().__init__(reason)
        self.field, self.reason, self.value = field, reason, value


# --- Options ---------------------------------------------------------------------------------------

def check_options(path: Path, options: ImportOptions) -> ImportOptions:
    """Validate everything that can be checked before reading the data; raise InvalidInput naming the option."""
    if not path.is_file():
        raise InvalidInput(f"{str(path)!r} is not a readable file", field="path")
    if options.format is None:
        suffix = path.suffix.lower()
        options.format = "jsonl" if suffix in (".jsonl", ".ndjson") else "csv" if suffix in (".csv", ".tsv", ".txt") else None
        if options.format is None:
            raise InvalidInput(f"cannot tell the format from {path.name!r}: give csv or jsonl", field="format")
    if options.format not in FORMATS:
        raise InvalidInput(f"{options.format!r} is not one of {', '.join(FORMATS)}", field="format")
    if options.mode not in MODES:
        raise InvalidInput(f"{options.mode!r} is not one of {', '.join(MODES)}", field="mode")
    if not isinstance(options.batch_size, int) or not 1 <= options.batch_size <= 50_000:
        raise InvalidInput("must be an integer from 1 to 50000", field="batch_size")
    contacts.check_source(options.source)
    if options.list is not None:
        contacts.check_list_name(options.list)
    if not isinstance(options.mapping, dict):
        raise InvalidInput("must be a mapping of column names to targets", field="mapping")
    for column, target in options.mapping.items():
        if not isinstance(column, str) or not isinstance(target, str) or not target:
            raise InvalidInput("column names and targets must be non-empty strings", field="mapping")
        if target not in FIELDS and target != IGNORE:
            check_attribute_name(target.removeprefix("attributes."), field=f"mapping.{column}")
    if not isinstance(options.types, dict):
        raise InvalidInput("must be a mapping of attribute names to types", field="types")
    for name, kind in options.types.items():
        check_attribute_name(name, field="types")
        if kind not in TYPES:
            raise InvalidInput(f"{kind!r} is not one of {', '.join(TYPES)}", field=f"types.{name}")
    if options.encoding is not None:
        try:
            codecs.lookup(options.encoding)
        except LookupError:
            raise InvalidInput(f"{options.encoding!r} is not a known text encoding", field="encoding") from None
    if options.delimiter is not None:
        if options.delimiter == "\\t":
            options.delimiter = "\t"
        if len(options.delimiter) != 1 or options.delimiter in "\"\r\n" or options.delimiter.isalnum():
            raise InvalidInput("must be one character other than a quote, a letter, a digit or a line break",
                               field="delimiter")
    if options.format == "csv":
        header = _open_csv(path, options)[1]
        plan = _column_plan(header, options)
        if not any(kind == "email" for _, kind, _ in plan):
            raise InvalidInput(f"no column holds the email address (columns: {', '.join(header)}); map one "
                               "with email, e.g. --map 'E-Mail=email'", field="mapping")
    return options


# --- Reading ---------------------------------------------------------------------------------------

def _detect_encoding(sample: bytes) -> str:
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    # A UTF-8 file with a few broken rows is still UTF-8 (those rows are reported), so judge by the
    # share of lines that fail to decode, not by the first failure. The sample may end mid-character.
    lines = sample[:sample.rfind(b"\n") + 1 or len(sample)].split(b"\n")
    bad = 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    if bad <= max(1, len(lines) // 20):
        return "utf-8"
    best = from_bytes(sample).best()
    return best.encoding if best is not None else "cp1252"


def _sniff_delimiter(head: str) -> str:
    """The candidate that splits the first lines into the most rows of one same width (> 1), ties
    going to the comma. csv.Sniffer guesses wrong on short files and on files with a few bad rows."""
    best, best_score = ",", 0
    for candidate in ",;\t|":
        widths = [len(row) for row in csv.reader(io.StringIO(head), delimiter=candidate) if row]
        if not widths or widths[0] < 2:
            continue
        score = widths.count(widths[0])  # rows as wide as the header
        if score > best_score:
            best, best_score = candidate, score
    return best


def _open_csv(path: Path, options: ImportOptions) -> tuple[TextIO, list[str], Any]:
    """The file as text (undecodable bytes kept as surrogates, so the row they are in is reported),
    its header row and the csv reader positioned after it."""
    raw = path.open("rb")
    sample = raw.read(_SAMPLE)
    raw.seek(0)
    encoding = options.encoding or _detect_encoding(sample)
    if encoding in ("utf-8", "utf8") and sample.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"  # a BOM is never part of the first column's name
    options.encoding = encoding
    if options.delimiter is None:
        text_sample = sample.decode(encoding, errors="replace")
        head = "\n".join(text_sample.splitlines()[:50])
        options.delimiter = _sniff_delimiter(head)
    text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=options.delimiter, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        text.close()
        raise InvalidInput("the file is empty: a header row is expected", field="path") from None
    header = [h.strip() for h in header]
    if _SURROGATE.search("".join(header)):
        text.close()
        raise InvalidInput(f"the header row is not valid {encoding}; give --encoding", field="encoding")
    seen = set()
    for name in header:
        if name in seen:
            text.close()
            raise InvalidInput(f"column {name!r} appears twice in the header", field="header")
        seen.add(name)
    missing = [column for column in options.mapping if column not in seen]
    if missing:
        text.close()
        raise InvalidInput(f"no column {missing[0]!r} in the header ({', '.join(header)})", field=f"mapping.{missing[0]}")
    return text, header, reader


def _target(name: str, options: ImportOptions) -> str:
    if name in options.mapping:
        return options.mapping[name]
    return _DEFAULT_FIELDS.get(re.sub(r"[\s-]+", "_", name.strip().lower()), name)


def _column_plan(header: list[str], options: ImportOptions) -> list[tuple[int, str, str]]:
    """(index, kind, name): kind is a contact field, or 'attr' with the attribute's name."""
    plan = []
    taken: dict[str, str] = {}
    for index, column in enumerate(header):
        target = _target(column, options)
        if target == IGNORE:
            continue
        kind, name = (target, target) if target in FIELDS else ("attr", target.removeprefix("attributes."))
        if kind == "attr":
            check_attribute_name(name, field=f"mapping.{column}")
        if (kind, name) in [(k, n) for _, k, n in plan]:
            raise InvalidInput(f"columns {taken[name]!r} and {column!r} both map to {name}", field=f"mapping.{column}")
        taken[name] = column
        plan.append((index, kind, name))
    return plan


def convert(value: Any, kind: str) -> Any:
    """A CSV cell (or a JSON value) as the declared attribute type; ValueError says why not."""
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "json":
        return json.loads(value, parse_constant=_refuse_constant, parse_float=_finite_float) \
            if isinstance(value, str) else value
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")
    if kind == "integer" and type(value) is str and value.isdigit():  # the common case, first
        return int(value)
    if kind in ("number", "integer"):
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        if isinstance(value, (int, float)):
            number = value
        else:
            text = str(value).strip()
            try:
                number = int(text) if _INT.fullmatch(text) else float(text)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        if kind == "integer":
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            return int(number)
        return number
    if kind == "date":
        return date.fromisoformat(str(value).strip()[:10] if "T" in str(value) else str(value).strip()).isoformat()
    if kind == "datetime":
        moment = datetime.fromisoformat(str(value).strip())
        if moment.tzinfo is not None:  # stored as naive UTC, like every time in SmartMail
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        return moment.isoformat(timespec="seconds")
    raise ValueError(f"unknown type {kind}")


def _clip(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # Undecodable bytes (kept as surrogates by the reader) shown as \xNN.
    text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    return text[:_MAX_VALUE_IN_REPORT]


@dataclass
class Record:
    row: int
    email: str
    status: str | None
    timezone: str | None
    locale: str | None
    attributes: dict[str, Any]


def _build(row_no: int, values: dict[str, Any], attributes: dict[str, Any], options: ImportOptions) -> Record:
    """Validate one row's fields; RowError names the first bad one."""
    raw_email = values.get("email")
    if raw_email is None or (isinstance(raw_email, str) and not raw_email.strip()):
        raise RowError("email", "missing email address")
    email, reason = contacts.email_problem(raw_email)
    if reason:
        raise RowError("email", reason, raw_email)
    status = values.get("status") or None
    if status is not None and status not in contacts.STATUSES:
        status = status.strip().lower() if isinstance(status, str) else status
        if status not in contacts.STATUSES:
            raise RowError("status", f"{status!r} is not one of {', '.join(contacts.STATUSES)}", status)
    tz = values.get("timezone") or None
    locale = values.get("locale") or None
    if tz is not None or locale is not None:
        try:
            tz = contacts.check_timezone(tz)
            locale = contacts.check_locale(locale)
        except InvalidInput as exc:
            raise RowError(exc.field, exc.reason, tz if exc.field == "timezone" else locale) from None
    for name, kind in options.types.items():
        if name in attributes:
            try:
                attributes[name] = convert(attributes[name], kind)
            except (ValueError, TypeError) as exc:
                raise RowError(name, f"not a valid {kind}: {exc}", attributes[name]) from None
    return Record(row_no, email, status, tz, locale, attributes)


def read_csv(path: Path, options: ImportOptions) -> Iterator[tuple[int, Record | RowError, Callable[[], int]]]:
    """(row number, record or error, a function giving the bytes read so far); the header is
    row 1, as in a spreadsheet."""
    text, header, reader = _open_csv(path, options)
    plan = _column_plan(header, options)
    attribute_columns = [(i, name) for i, kind, name in plan if kind == "attr"]
    field_columns = [(i, kind) for i, kind, _ in plan if kind != "attr"]
    width = len(header)
    tell = text.buffer.tell  # called once per batch, not per row
    with text:
        row_no = 1
        for cells in reader:
            row_no += 1
            if not cells:
                continue  # a blank line
            if len(cells) != width:
                yield row_no, RowError("(row)", f"expected {width} columns, found {len(cells)}",
                                       options.delimiter.join(cells)), tell
                continue
            if _SURROGATE.search("\0".join(cells)):  # one search per row; the cell is found only if needed
                index = next(i for i, _, _ in plan if _SURROGATE.search(cells[i]))
                item: Record | RowError = RowError(header[index], f"undecodable bytes (not valid {options.encoding})",
                                                   cells[index])
            else:
                # An empty cell sets nothing (and so erases nothing).
                attributes = {name: cells[i] for i, name in attribute_columns if cells[i] != ""}
                values = {kind: cells[i] for i, kind in field_columns}
                try:
                    item = _build(row_no, values, attributes, options)
                except RowError as exc:
                    item = exc
            yield row_no, item, tell


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json accepts NaN and Infinity; databases do not


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as infinity
        raise ValueError(f"{text} is out of range for a number")
    return value


def _has_lone_surrogate(item: Any) -> bool:
    try:
        json.dumps(item, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_jsonl(path: Path, options: ImportOptions) -> Iterator[tuple[int, Record | RowError, Callable[[], int]]]:
    """(line number, record or error, bytes-read function) for a JSON Lines file (UTF-8, RFC 8259)."""
    with path.open("rb") as raw:
        position = raw.tell
        for row_no, line in enumerate(raw, start=1):
            if row_no == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[3:]
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
            except UnicodeDecodeError as exc:
                yield row_no, RowError("(row)", f"undecodable bytes (not valid UTF-8): {exc.reason}", line), position
                continue
            except json.JSONDecodeError as exc:
                yield row_no, RowError("(row)", f"not valid JSON: {exc.msg} at column {exc.colno}",
                                       line.decode("utf-8")), position
                continue
            except ValueError as exc:  # _refuse_constant, _finite_float
                yield row_no, RowError("(row)", f"not valid JSON: {exc}", line.decode("utf-8")), position
                continue
            if (b"\\ud" in line or b"\\uD" in line) and _has_lone_surrogate(item):
                yield row_no, RowError("(row)", "a \\u escape encodes half a character (a lone surrogate)",
                                       line.decode("utf-8")), position
                continue
            if not isinstance(item, dict):
                yield row_no, RowError("(row)", "each line must be a JSON object", line.decode("utf-8")), position
                continue
            values: dict[str, Any] = {}
            attributes: dict[str, Any] = {}
            try:
                for key, value in item.items():
                    target = _target(key, options)
                    if target == IGNORE:
                        continue
                    if key == "attributes" and target == "attributes" and isinstance(value, dict):
                        for name, inner in value.items():
                            check_attribute_name(name, field=f"attributes.{name}")
                            if inner is not None:
                                attributes[name] = inner
                    elif target in FIELDS:
                        if value is not None and not isinstance(value, str):
                            raise RowError(target, "must be a string", value)
                        values[target] = value
                    elif value is not None:
                        attributes[check_attribute_name(target.removeprefix("attributes."), field=key)] = value
                yield row_no, _build(row_no, values, attributes, options), position
            except RowError as exc:
                yield row_no, exc, position
            except InvalidInput as exc:
                yield row_no, RowError(exc.field, exc.reason, None), position


# --- Writing ---------------------------------------------------------------------------------------

_PG_STAGING = """CREATE TEMP TABLE IF NOT EXISTS smartmail_import_staging (
    email text, status text, timezone text, locale text, attributes jsonb) ON COMMIT DELETE ROWS"""
# One INSERT … ON CONFLICT per batch. Attributes merge (a file's attributes add to and override
# what is stored); an empty cell or absent key leaves the stored field as it was.
_UPSERT_SET = {
    "postgresql": """status = EXCLUDED.status, timezone = COALESCE(EXCLUDED.timezone, contacts.timezone),
        locale = COALESCE(EXCLUDED.locale, contacts.locale), attributes = contacts.attributes || EXCLUDED.attributes,
        updated_at = EXCLUDED.updated_at, last_import_id = EXCLUDED.last_import_id""",
    "sqlite": """status = excluded.status, timezone = COALESCE(excluded.timezone, contacts.timezone),
        locale = COALESCE(excluded.locale, contacts.locale),
        attributes = json_patch(contacts.attributes, excluded.attributes),
        updated_at = excluded.updated_at, last_import_id = excluded.last_import_id""",
}
# In create-only mode known addresses are left alone, except for the mark that says this job saw them.
_MARK_ONLY_SET = "last_import_id = excluded.last_import_id"


_json_fallback = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode


def _to_json(attributes: dict[str, Any]) -> str:
    """orjson: 0.7 us a row here against 3 us for the standard library's C encoder (itself 3x
    faster with ensure_ascii than without), a tenth of an import's Python time. Integers beyond
    64 bits are left to the standard library. Non-finite numbers, which orjson would write as
    null, never get here: the readers refuse them."""
    try:
        return orjson.dumps(attributes).decode()
    except orjson.JSONEncodeError:
        return _json_fallback(attributes)
# COPY text format: backslash, tab, newline and carriage return are escaped; \N is NULL.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL, _BS, _BS2 = "\\N", "\\", "\\\\"


def _copy_line(row: tuple) -> str:
    return "\t".join("\\N" if v is None else v.translate(_COPY_ESCAPES) for v in row) + "\n"


def _copy_text(rows: list[tuple[str, str, str | None, str | None, str]]) -> str:
    """The batch's (email, status, timezone, locale, attributes JSON) rows as COPY text.

    str.translate costs ~2 us a field, most of the Python time of a PostgreSQL import, and the
    validated fields almost never need it: the text fields are checked in one search over the
    whole batch, and the JSON (ASCII, its control characters escaped by the encoder) only ever
    needs its backslashes doubled."""
    if COPY_SPECIAL.search("".join([f"{e}{t or ''}{lo or ''}" for e, _, t, lo, _ in rows])):
        return "".join(map(_copy_line, rows))
    return "".join([f"{e}\t{s}\t{t or _NULL}\t{lo or _NULL}\t{a.replace(_BS, _BS2)}\n" for e, s, t, lo, a in rows])


@dataclass
class BatchResult:
    created: int = 0
    updated: int = 0
    skipped: int = 0
    errors: list[tuple[int, RowError]] = field(default_factory=list)


def _sqlite_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's own SQLite DateTime format


def _pg_text_array(values: list[str]) -> str:
    """A text[] literal built in one join: psycopg's list adapter costs ~10 us per element.
    Validated addresses never hold a quote or backslash, so escaping is almost never needed."""
    everything = "".join(values)
    if '"' not in everything and "\\" not in everything:
        return '{"' + '","'.join(values) + '"}' if values else "{}"
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _known(connection: Connection, emails: list[str]) -> tuple[dict[str, tuple[str | None, str]], dict[str, str]]:
    """({email: (last_import_id, status)} of known contacts, {email: suppression reason})."""
    if connection.dialect.name == "postgresql":
        cursor = connection.connection.driver_connection.cursor()
        array = _pg_text_array(emails)
        # Index look-ups whatever the statistics say: while a new or truncated table is being
        # loaded its statistics lag behind and the planner picks a sequential scan of millions of
        # rows per batch (seen: 20 s a batch instead of 20 ms).
        # One query for both tables: half the time of two `= ANY(array)` look-ups (measured).
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SELECT b.email, c.id IS NOT NULL, c.last_import_id, c.status, s.reason "
                       "FROM unnest(%s::text[]) b(email) LEFT JOIN contacts c ON c.email = b.email "
                       "LEFT JOIN suppressions s ON s.email = b.email WHERE c.id IS NOT NULL OR s.email IS NOT NULL",
                       (array,))
        rows = cursor.fetchall()
        cursor.execute("SET LOCAL enable_seqscan = DEFAULT")
        known = {email: (mark, status) for email, is_contact, mark, status, _ in rows if is_contact}
        return known, {email: reason for email, _, _, _, reason in rows if reason is not None}
    known, suppressed = {}, {}
    for start in range(0, len(emails), 30000):  # SQLite allows 32,766 parameters per statement
        chunk = emails[start:start + 30000]
        marks = ",".join("?" * len(chunk))
        cursor = connection.exec_driver_sql(
            f"SELECT email, last_import_id, status FROM contacts WHERE email IN ({marks})", tuple(chunk))
        known.update({email: (mark, status) for email, mark, status in cursor})
        cursor = connection.exec_driver_sql(f"SELECT email, reason FROM suppressions WHERE email IN ({marks})",
                                            tuple(chunk))
        suppressed.update(dict(cursor.fetchall()))
    return known, suppressed


def write_batch(connection: Connection, job_id: str, records: list[Record], options: ImportOptions,
                list_id: int | None) -> BatchResult:
    """Write one batch in the caller's transaction: in-file duplicates found, mode applied, one upsert,
    list memberships joined, suppressed addresses kept suppressed."""
    result = BatchResult()
    first_row: dict[str, int] = {}
    unique: list[Record] = []
    for record in records:
        if record.email in first_row:
            result.errors.append((record.row, RowError("email", f"duplicate of row {first_row[record.email]}",
                                                       record.email)))
        else:
            first_row[record.email] = record.row
            unique.append(record)
    if not unique:
        return result
    known, suppressed = _known(connection, [r.email for r in unique])
    rows: list[tuple] = []
    members: list[str] = []
    new_suppressions: list[tuple[str, str]] = []
    for record in unique:
        mark, current = known.get(record.email, (None, None))
        if mark == job_id:  # written earlier in this file: a duplicate row
            result.errors.append((record.row, RowError("email", "duplicate of an earlier row in this file",
                                                       record.email)))
            continue
        exists = current is not None
        if (options.mode == "update" and not exists):
            result.skipped += 1
            continue
        if options.mode == "create" and exists:
            result.skipped += 1
        elif exists:
            result.updated += 1
        else:
            result.created += 1
        # A bulk import never resubscribes an address that bounced, complained or unsubscribed:
        # it can move a contact away from `subscribed`, never back.
        reason = suppressed.get(record.email)
        if reason:
            status = contacts.SUPPRESSION_TO_STATUS.get(reason, "blocked")
        elif current in contacts.STATUS_TO_SUPPRESSION and record.status in (None, "subscribed"):
            status = current
        else:
            status = record.status or current or "subscribed"
            if status in contacts.STATUS_TO_SUPPRESSION and not (options.mode == "create" and exists):
                new_suppressions.append((record.email, contacts.STATUS_TO_SUPPRESSION[status]))
        rows.append((record.email, status, record.timezone, record.locale, _to_json(record.attributes)))
        members.append(record.email)
    if rows:
        _upsert(connection, job_id, rows, options, list_id, all_new=not known)
        if new_suppressions:
            _suppress(connection, new_suppressions)
        if list_id is not None and connection.dialect.name != "postgresql":  # PostgreSQL joins in _upsert
            _join(connection, list_id, members, f"import:{job_id}")
    return result


def _upsert(connection: Connection, job_id: str, rows: list[tuple], options: ImportOptions,
            list_id: int | None, all_new: bool) -> None:
    now = utcnow()
    set_clause = _MARK_ONLY_SET if options.mode == "create" else _UPSERT_SET[connection.dialect.name]
    if connection.dialect.name == "postgresql":
        # COPY into a session-local staging table, then one INSERT … SELECT … ON CONFLICT: COPY
        # loads several times faster than executemany (DESIGN.md: ~140k vs ~21k rows/s).
        cursor = connection.connection.driver_connection.cursor()
        cursor.execute(_PG_STAGING)
        with cursor.copy("COPY smartmail_import_staging (email, status, timezone, locale, attributes) "
                         "FROM STDIN") as copy:
            copy.write(_copy_text(rows))  # one write: ~3x cheaper than write_row per row
        insert = ("INSERT INTO contacts (email, status, timezone, locale, attributes, source, created_at, updated_at, "
                  "last_import_id) SELECT email, status, timezone, locale, attributes, %(source)s, %(now)s, %(now)s, "
                  "%(job)s FROM smartmail_import_staging")
        upsert = f"{insert} ON CONFLICT (email) DO UPDATE SET {set_clause}"
        params = {"source": options.source, "now": now, "job": job_id}
        if list_id is not None:
            # The upserted ids join the list in the same statement: no second look-up by email.
            # ON CONFLICT DO NOTHING: someone who left the list stays off it.
            params.update(list=list_id, member_source=f"import:{job_id}")
            # (New contacts cannot be members yet, so their memberships need no ON CONFLICT either.)
            insert, upsert = ((f"WITH upserted AS ({statement} RETURNING id) INSERT INTO list_memberships "
                               "(list_id, contact_id, status, joined_at, source) SELECT %(list)s, id, 'subscribed', "
                               f"%(now)s, %(member_source)s FROM upserted{conflict}")
                              for statement, conflict in ((insert, ""), (upsert, " ON CONFLICT DO NOTHING")))
        if all_new:
            # Every address was unknown a moment ago; a concurrent writer may have added one since.
            insert_else_upsert(cursor, insert, upsert, params)
        else:
            cursor.execute(upsert, params)
        return  # the staging rows go at COMMIT
    stamp = _sqlite_time(now)
    values = [(*row, options.source, stamp, stamp, job_id) for row in rows]
    insert = ("INSERT INTO contacts (email, status, timezone, locale, attributes, source, created_at, updated_at, "
              "last_import_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    # No savepoint needed for a plain INSERT here: SQLite writers are serialized (BEGIN IMMEDIATE),
    # so no address can have appeared since the batch's look-up.
    connection.exec_driver_sql(insert if all_new else f"{insert} ON CONFLICT (email) DO UPDATE SET {set_clause}",
                               values)


def _suppress(connection: Connection, pairs: list[tuple[str, str]]) -> None:
    now = utcnow()
    if connection.dialect.name == "postgresql":
        cursor = connection.connection.driver_connection.cursor()
        cursor.executemany("INSERT INTO suppressions (email, reason, detail, created_at) VALUES (%s, %s, %s, %s) "
                           "ON CONFLICT (email) DO NOTHING", [(e, r, "import", now) for e, r in pairs])
        return
    connection.exec_driver_sql("INSERT INTO suppressions (email, reason, detail, created_at) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (email) DO NOTHING", [(e, r, "import", _sqlite_time(now)) for e, r in pairs])


def _join(connection: Connection, list_id: int, emails: list[str], source: str) -> None:
    """SQLite: the batch's contacts join the list (ON CONFLICT DO NOTHING: leavers stay off)."""
    now = utcnow()
    for start in range(0, len(emails), 30000):
        chunk = emails[start:start + 30000]
        connection.exec_driver_sql(
            "INSERT INTO list_memberships (list_id, contact_id, status, joined_at, source) "
            f"SELECT ?, id, 'subscribed', ?, ? FROM contacts WHERE email IN ({','.join('?' * len(chunk))}) "
            "ON CONFLICT DO NOTHING", (list_id, _sqlite_time(now), source, *chunk))


# --- Jobs ------------------------------------------------------------------------------------------

def create_job(path: str | os.PathLike, **options: Any) -> str:
    """Check the file and options (InvalidInput naming the option) and store a pending job; returns its id."""
    known = set(ImportOptions.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise InvalidInput(f"unknown option(s) {', '.join(sorted(unknown))}", field="options")
    opts = check_options(Path(path).resolve(), ImportOptions(**options))
    with session_scope() as session:
        list_id = None
        if opts.list is not None:
            list_id = session.scalar(select(ContactList.id).where(ContactList.name == opts.list))
            if list_id is None:
                raise InvalidInput(f"no list named {opts.list!r}", field="list")
        job = ImportJob(id=new_id(), state="pending", path=str(Path(path).resolve()), options=opts.__dict__.copy(),
                        list_id=list_id, total_bytes=Path(path).stat().st_size, created_at=utcnow())
        session.add(job)
        return job.id


def start_import(path: str | os.PathLike, **options: Any) -> str:
    """Create an import job and queue it on the `imports` queue (after the commit); returns the job id."""
    job_id = create_job(path, **options)
    enqueue(job_id)
    return job_id


def enqueue(job_id: str) -> None:
    publish("smartmail.imports.run", job_id)


class JobGone(Exception):
    """Another run of the same job moved its checkpoint: this run stops."""


Batch = tuple[list[Record], list[tuple[int, RowError]], int, int]  # records, errors, last row, bytes read


def _batches(path: Path, options: ImportOptions, checkpoint: int) -> Iterator[Batch]:
    """The rows after the checkpoint in batches of options.batch_size (good and bad rows counted)."""
    reader = read_jsonl if options.format == "jsonl" else read_csv
    records: list[Record] = []
    errors: list[tuple[int, RowError]] = []
    last_row, tell = checkpoint, (lambda: 0)
    for row_no, item, tell in reader(path, options):
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


_DONE = object()


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
        _write_in_order(job_id, _read_ahead(_batches(path, options, checkpoint)), checkpoint, options, list_id,
                        on_progress)
    except JobGone:
        log.warning("import.superseded", job_id=job_id)
        return job_status(job_id)
    except Exception as exc:
        with session_scope() as session:
            session.execute(update(ImportJob).where(ImportJob.id == job_id)
                            .values(state="failed", error=f"{type(exc).__name__}: {exc}"))
        log.error("import.failed", job_id=job_id, error=str(exc))
        raise
    with session_scope() as session:
        job = session.get(ImportJob, job_id)
        job.state, job.finished_at, job.bytes_read = "done", utcnow(), job.total_bytes
    status = job_status(job_id)
    log.info("import.done", **{k: status[k] for k in ("job_id", "created", "updated", "skipped", "failed")})
    if on_progress:
        on_progress(status)
    return status


def _write_in_order(job_id: str, batches: Iterator[Batch], checkpoint: int, options: ImportOptions,
                    list_id: int | None, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    """Commit the batches in file order. On PostgreSQL SMARTMAIL_IMPORT_WRITERS batches are written
    at once, each on its own connection: one server process alone is the bottleneck of an import
    there, and other cores would idle. Order and the checkpoint still hold: a batch moves the job's
    checkpoint from where the previous batch leaves it, and only once that batch has committed,
    so it commits after it, or finds the checkpoint unmoved (JobGone) if that batch failed. A
    batch cannot see the rows of the batches being written beside it, so addresses repeated
    between them are found here, in memory."""
    writers = get_settings().import_writers
    if writers == 1 or get_engine().dialect.name != "postgresql":  # one writer at a time in SQLite anyway
        for records, errors, last_row, position in batches:
            checkpoint = _commit_batch(job_id, checkpoint, last_row, position, records, errors, options, list_id)
            if on_progress:
                on_progress(job_status(job_id))
        return
    in_flight: collections.deque[Future] = collections.deque()
    recent: collections.deque[dict[str, int]] = collections.deque(maxlen=writers - 1)  # email -> row
    committed = threading.Event()  # the previous batch's transaction has ended
    committed.set()

    def write(batch: Batch, checkpoint: int, after: threading.Event, done: threading.Event) -> int:
        records, errors, last_row, position = batch
        try:
            return _commit_batch(job_id, checkpoint, last_row, position, records, errors, options, list_id,
                                 after=after)
        finally:
            done.set()

    def finish_oldest() -> None:
        in_flight.popleft().result()
        if on_progress:
            on_progress(job_status(job_id))

    with ThreadPoolExecutor(writers, thread_name_prefix="smartmail-import-writer") as pool:
        for records, errors, last_row, position in batches:
            records, errors, mine = _drop_repeats(records, errors, recent)
            recent.append(mine)
            if len(in_flight) == writers:
                finish_oldest()
            after, committed = committed, threading.Event()
            in_flight.append(pool.submit(write, (records, errors, last_row, position), checkpoint, after, committed))
            checkpoint = last_row
        while in_flight:
            finish_oldest()


def _drop_repeats(records: list[Record], errors: list[tuple[int, RowError]],
                  recent: Iterable[dict[str, int]]) -> tuple[list[Record], list[tuple[int, RowError]], dict[str, int]]:
    """Rows whose address one of the recent batches has: reported as duplicates. Returns this
    batch's records and errors, and its own email -> first row."""
    previous: dict[str, int] = {}
    for batch in recent:
        previous.update(batch)
    repeated = [r for r in records if r.email in previous]
    if repeated:
        records = [r for r in records if r.email not in previous]
        errors = errors + [(r.row, RowError("email", f"duplicate of row {previous[r.email]}", r.email))
                           for r in repeated]
    return records, errors, {r.email: r.row for r in reversed(records)}


def _commit_batch(job_id: str, checkpoint: int, last_row: int, position: int, records: list[Record],
                  errors: list[tuple[int, RowError]], options: ImportOptions, list_id: int | None,
                  after: threading.Event | None = None) -> int:
    with get_engine().begin() as connection:
        if connection.dialect.name == "sqlite":
            # SQLite's default page cache is 2 MB: past a few hundred thousand contacts the email
            # index no longer fits and every look-up and insert reads pages through the OS.
            connection.exec_driver_sql(f"PRAGMA cache_size = -{_SQLITE_CACHE_KB}")
        else:
            # A batch commits with its checkpoint, so one lost in a server crash is imported again
            # by the re-run; the job's final commit is synchronous and makes every batch durable.
            connection.exec_driver_sql("SET LOCAL synchronous_commit = off")
        result = write_batch(connection, job_id, records, options, list_id) if records else BatchResult()
        all_errors = errors + result.errors
        if all_errors:
            connection.execute(ImportRowError.__table__.insert(), [
                {"job_id": job_id, "row": row, "field": error.field[:200], "reason": error.reason,
                 "value": _clip(error.value)} for row, error in all_errors])
        # The checkpoint moves only from where this run found it: a second run of the same job
        # (a redelivered task) cannot commit the same rows twice.
        if after is not None:
            after.wait()  # the batch before has committed (or failed: then the checkpoint has not moved)
        moved = connection.execute(
            update(ImportJob).where(ImportJob.id == job_id, ImportJob.rows_done == checkpoint)
            .values(rows_done=last_row, bytes_read=position, created=ImportJob.created + result.created,
                    updated=ImportJob.updated + result.updated, skipped=ImportJob.skipped + result.skipped,
                    failed=ImportJob.failed + len(all_errors)))
        if moved.rowcount != 1:
            raise JobGone(job_id)
    return last_row


def job_status(job_id: str) -> dict[str, Any]:
    with session_scope() as session:
        job = session.get(ImportJob, job_id)
        if job is None:
            raise InvalidInput(f"no import job {job_id}", field="job_id")
        return {"job_id": job.id, "state": job.state, "path": job.path, "options": job.options,
                "total_bytes": job.total_bytes, "bytes_read": job.bytes_read, "rows_done": job.rows_done,
                "created": job.created, "updated": job.updated, "skipped": job.skipped, "failed": job.failed,
                "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
                "finished_at": job.finished_at}


def write_error_report(job_id: str, out: TextIO) -> int:
    """The job's bad rows as CSV (row, field, reason, value), in row order; returns how many.
    Values are neutralized like exports, since the report is meant to be opened in a spreadsheet."""
    from smartmail.audience.exports import safe_cell

    writer = csv.writer(out)
    writer.writerow(["row", "field", "reason", "value"])
    count = 0
    with reader() as connection:
        table = ImportRowError.__table__
        result = connection.execution_options(yield_per=5000).execute(
            select(table.c.row, table.c.field, table.c.reason, table.c.value)
            .where(table.c.job_id == job_id).order_by(table.c.row))
        for row, field_name, reason, value in result:
            writer.writerow([row, safe_cell(field_name), safe_cell(reason), safe_cell(value or "")])
            count += 1
    return count
