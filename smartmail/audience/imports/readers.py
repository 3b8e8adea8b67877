"""Streaming CSV and JSON Lines readers: encoding and delimiter detection, one Record or RowError per row."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from charset_normalizer import from_bytes

from smartmail.audience.contacts import InvalidInput, check_attribute_name
from smartmail.audience.imports.options import (
    FIELDS,
    IGNORE,
    ImportOptions,
    Record,
    RowError,
    build_record,
    column_plan,
    finite_float,
    refuse_constant,
    target,
)

_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes the codec could not decode (errors="surrogateescape")
_SAMPLE = 64 * 1024

Item = tuple[int, Record | RowError, Callable[[], int]]  # row number, record or error, bytes read so far


def _detect_encoding(sample: bytes) -> str:
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    # A UTF-8 file with a few broken rows is still UTF-8 (those rows are reported), so judge by the
    # share of lines that fail to decode, not by the first failure. The sample may end mid-character.
    lines = sample[: sample.rfind(b"\n") + 1 or len(sample)].split(b"\n")
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
    try:
        if options.delimiter is None:
            text_sample = sample.decode(encoding, errors="replace")
            head = "\n".join(text_sample.splitlines()[:50])
            options.delimiter = _sniff_delimiter(head)
        text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=options.delimiter, strict=False)
        header = next(reader)
    except StopIteration:
        text.close()
        raise InvalidInput("the file is empty: a header row is expected", field="path") from None
    except UnicodeError as exc:
        # Codecs that cannot keep undecodable bytes aside (UTF-16 and UTF-32 on a truncated or
        # BOM-less file, idna, punycode): the header row itself cannot be read.
        raw.close()
        raise InvalidInput(f"the header row cannot be read as {encoding} ({exc})", field="encoding") from None
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
        raise InvalidInput(
            f"no column {missing[0]!r} in the header ({', '.join(header)})", field=f"mapping.{missing[0]}"
        )
    return text, header, reader


def check_header(path: Path, options: ImportOptions) -> ImportOptions:
    """A CSV file's header against the (checked) options: encoding and delimiter settled, one column
    holding the email address; raise InvalidInput naming the option."""
    if options.format == "csv":
        header = _open_csv(path, options)[1]
        plan = column_plan(header, options)
        if not any(kind == "email" for _, kind, _ in plan):
            raise InvalidInput(
                f"no column holds the email address (columns: {', '.join(header)}); map one "
                "with email, e.g. --map 'E-Mail=email'",
                field="mapping",
            )
    return options


def read_csv(path: Path, options: ImportOptions) -> Iterator[Item]:
    """(row number, record or error, a function giving the bytes read so far); the header is
    row 1, as in a spreadsheet."""
    text, header, reader = _open_csv(path, options)
    plan = column_plan(header, options)
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
                yield (
                    row_no,
                    RowError(
                        "(row)", f"expected {width} columns, found {len(cells)}", (options.delimiter or ",").join(cells)
                    ),
                    tell,
                )
                continue
            if _SURROGATE.search("\0".join(cells)):  # one search per row; the cell is found only if needed
                index = next(i for i, _, _ in plan if _SURROGATE.search(cells[i]))
                item: Record | RowError = RowError(
                    header[index], f"undecodable bytes (not valid {options.encoding})", cells[index]
                )
            else:
                # An empty cell sets nothing (and so erases nothing).
                attributes = {name: cells[i] for i, name in attribute_columns if cells[i] != ""}
                values = {kind: cells[i] for i, kind in field_columns}
                try:
                    item = build_record(row_no, values, attributes, options)
                except RowError as exc:
                    item = exc
            yield row_no, item, tell


def _has_lone_surrogate(item: Any) -> bool:
    try:
        json.dumps(item, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_jsonl(path: Path, options: ImportOptions) -> Iterator[Item]:
    """(line number, record or error, bytes-read function) for a JSON Lines file (UTF-8, RFC 8259)."""
    with path.open("rb") as raw:
        position = raw.tell
        for row_no, line in enumerate(raw, start=1):
            if row_no == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[3:]
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"), parse_constant=refuse_constant, parse_float=finite_float)
            except UnicodeDecodeError as exc:
                yield row_no, RowError("(row)", f"undecodable bytes (not valid UTF-8): {exc.reason}", line), position
                continue
            except json.JSONDecodeError as exc:
                yield (
                    row_no,
                    RowError("(row)", f"not valid JSON: {exc.msg} at column {exc.colno}", line.decode("utf-8")),
                    position,
                )
                continue
            except ValueError as exc:  # refuse_constant, finite_float
                yield row_no, RowError("(row)", f"not valid JSON: {exc}", line.decode("utf-8")), position
                continue
            if (b"\\ud" in line or b"\\uD" in line) and _has_lone_surrogate(item):
                yield (
                    row_no,
                    RowError("(row)", "a \\u escape encodes half a character (a lone surrogate)", line.decode("utf-8")),
                    position,
                )
                continue
            if not isinstance(item, dict):
                yield row_no, RowError("(row)", "each line must be a JSON object", line.decode("utf-8")), position
                continue
            values: dict[str, Any] = {}
            attributes: dict[str, Any] = {}
            try:
                for key, value in item.items():
                    goes_to = target(key, options)
                    if goes_to == IGNORE:
                        continue
                    if key == "attributes" and goes_to == "attributes" and isinstance(value, dict):
                        for name, inner in value.items():
                            check_attribute_name(name, field=f"attributes.{name}")
                            if inner is not None:
                                attributes[name] = inner
                    elif goes_to in FIELDS:
                        if value is not None and not isinstance(value, str):
                            raise RowError(goes_to, "must be a string", value)
                        values[goes_to] = value
                    elif value is not None:
                        attributes[check_attribute_name(goes_to.removeprefix("attributes."), field=key)] = value
                yield row_no, build_record(row_no, values, attributes, options), position
            except RowError as exc:
                yield row_no, exc, position
            except InvalidInput as exc:
                yield row_no, RowError(exc.field, exc.reason, None), position
