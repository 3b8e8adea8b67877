"""Import options and what they mean for a row: validation, column mapping, attribute types, one row as a Record."""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from smartmail.audience import contacts
from smartmail.audience.contacts import InvalidInput, check_attribute_name

MODES = ("upsert", "create", "update")
FORMATS = ("csv", "jsonl")
TYPES = ("string", "number", "integer", "boolean", "date", "datetime", "json")
FIELDS = ("email", "status", "timezone", "locale")
IGNORE = "ignore"
# Header names understood without a mapping (compared lower-cased, spaces and dashes as _).
_DEFAULT_FIELDS = {
    "email": "email",
    "e_mail": "email",
    "email_address": "email",
    "mail": "email",
    "status": "status",
    "timezone": "timezone",
    "time_zone": "timezone",
    "tz": "timezone",
    "locale": "locale",
    "language": "locale",
}
_TRUE = frozenset({"true", "yes", "y", "t", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "f", "0", "off"})
_INT = re.compile(r"[+-]?\d+")


@dataclass
class ImportOptions:
    """What `start_import` / `create_job` accept; stored with the job so a re-run reads the file the same way."""

    format: str | None = None  # csv | jsonl; from the file name when None
    mode: str = "upsert"  # upsert | create (new addresses only) | update (known addresses only)
    list: str | None = None  # join every imported contact to this list
    mapping: dict[str, str] = field(default_factory=dict)  # column -> email|status|timezone|locale|ignore|<attribute>
    types: dict[str, str] = field(default_factory=dict)  # attribute -> string|number|integer|boolean|date|…
    delimiter: str | None = None  # CSV; sniffed when None
    encoding: str | None = None  # CSV; detected when None (a UTF-8 BOM always wins)
    batch_size: int = 5000
    source: str = "import"
    # Set for a file uploaded through the API: the name it was sent under, and a sign that the file
    # is SmartMail's own, removed once the job is done.
    upload_name: str | None = None


class RowError(Exception):
    def __init__(self, field: str, reason: str, value: Any = None) -> None:
        super().__init__(reason)
        self.field, self.reason, self.value = field, reason, value


@dataclass
class Record:
    row: int
    email: str
    status: str | None
    timezone: str | None
    locale: str | None
    attributes: dict[str, Any]


def check_options(path: Path, options: ImportOptions) -> ImportOptions:
    """Validate the options that can be checked without reading the file; raise InvalidInput naming
    the option. (`readers.check_header` checks a CSV file's header against them.)"""
    if not path.is_file():
        raise InvalidInput(f"{str(path)!r} is not a readable file", field="path")
    if options.format is None:
        options.format = format_from_name(path.name)
        if options.format is None:
            raise InvalidInput(f"cannot tell the format from {path.name!r}: give csv or jsonl", field="format")
    if options.format not in FORMATS:
        raise InvalidInput(f"{options.format!r} is not one of {', '.join(FORMATS)}", field="format")
    if options.mode not in MODES:
        raise InvalidInput(f"{options.mode!r} is not one of {', '.join(MODES)}", field="mode")
    if not isinstance(options.batch_size, int) or not 1 <= options.batch_size <= 50_000:
        raise InvalidInput("must be an integer from 1 to 50000", field="batch_size")
    contacts.check_source(options.source)
    if options.upload_name is not None and (not isinstance(options.upload_name, str) or len(options.upload_name) > 255):
        raise InvalidInput("must be a file name of at most 255 characters", field="upload_name")
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
    _check_dialect(options)
    return options


def _check_dialect(options: ImportOptions) -> None:
    """A CSV file's encoding and delimiter, when given."""
    if options.encoding is not None:
        try:
            # A codec such as zlib or rot13 is known to Python but does not decode bytes to text.
            known = codecs.lookup(options.encoding)._is_text_encoding
        except LookupError:
            known = False
        if not known:
            raise InvalidInput(f"{options.encoding!r} is not a known text encoding", field="encoding")
    if options.delimiter is not None:
        if options.delimiter == "\\t":
            options.delimiter = "\t"
        if len(options.delimiter) != 1 or options.delimiter in '"\r\n' or options.delimiter.isalnum():
            raise InvalidInput(
                "must be one character other than a quote, a letter, a digit or a line break", field="delimiter"
            )


def format_from_name(name: str) -> str | None:
    """csv or jsonl, as a file's name tells it; None when it does not."""
    suffix = Path(name).suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".ndjson") else "csv" if suffix in (".csv", ".tsv", ".txt") else None


def parse_pairs(values: list[str], field: str) -> dict[str, str]:
    """`KEY=VALUE` items (the CLI's --map and --type, the API's map and type) as a mapping;
    InvalidInput naming `field` for an item that is not one."""
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InvalidInput(f"{item!r} is not KEY=VALUE", field=field)
        result[key] = value
    return result


def target(name: str, options: ImportOptions) -> str:
    """Where a column (or JSON key) goes: the mapping's target, else a known field's name, else itself."""
    if name in options.mapping:
        return options.mapping[name]
    return _DEFAULT_FIELDS.get(re.sub(r"[\s-]+", "_", name.strip().lower()), name)


def column_plan(header: list[str], options: ImportOptions) -> list[tuple[int, str, str]]:
    """(index, kind, name): kind is a contact field, or 'attr' with the attribute's name."""
    plan: list[tuple[int, str, str]] = []
    taken: dict[str, str] = {}
    for index, column in enumerate(header):
        goes_to = target(column, options)
        if goes_to == IGNORE:
            continue
        kind, name = (goes_to, goes_to) if goes_to in FIELDS else ("attr", goes_to.removeprefix("attributes."))
        if kind == "attr":
            check_attribute_name(name, field=f"mapping.{column}")
        if (kind, name) in [(k, n) for _, k, n in plan]:
            raise InvalidInput(f"columns {taken[name]!r} and {column!r} both map to {name}", field=f"mapping.{column}")
        taken[name] = column
        plan.append((index, kind, name))
    return plan


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json accepts NaN and Infinity; databases do not


def finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as infinity
        raise ValueError(f"{text} is out of range for a number")
    return value


def convert(value: Any, kind: str) -> Any:
    """A CSV cell (or a JSON value) as the declared attribute type; ValueError says why not."""
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "json":
        return (
            json.loads(value, parse_constant=refuse_constant, parse_float=finite_float)
            if isinstance(value, str)
            else value
        )
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


def build_record(row_no: int, values: dict[str, Any], attributes: dict[str, Any], options: ImportOptions) -> Record:
    """Validate one row's fields; RowError names the first bad one."""
    raw_email = values.get("email")
    if raw_email is None or (isinstance(raw_email, str) and not raw_email.strip()):
        raise RowError("email", "missing email address")
    email, reason = contacts.email_problem(raw_email)
    if email is None:
        raise RowError("email", reason or "not an email address", raw_email)
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
