"""Contact export to CSV, with spreadsheet formulas neutralized (OWASP "CSV Injection")."""

from __future__ import annotations

import csv
import json
from typing import Any, TextIO

from sqlalchemy import select

from smartmail.store.engine import reader
from smartmail.store.models import Contact

# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google Sheets;
# tab and carriage return can hide such a start (https://owasp.org/www-community/attacks/CSV_Injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
BASE_COLUMNS = (
    "email",
    "status",
    "timezone",
    "locale",
    "source",
    "created_at",
    "updated_at",
    "last_open_at",
    "last_click_at",
)


def safe_cell(value: Any) -> Any:
    """The value as a spreadsheet will show it, never as a formula: a leading ' makes it text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return safe_cell(json.dumps(value, ensure_ascii=False))
    return safe_cell(value)


def export_contacts(out: TextIO, *, contact_ids=None, batch: int = 5000) -> int:
    """Write contacts as CSV (base columns, then one column per attribute name); returns the count.
    `contact_ids` is an optional SELECT of contact ids (a list or a segment). Two streamed passes:
    the first finds the attribute names, so memory stays bounded whatever the number of contacts."""
    query = select(Contact.id, Contact.attributes, *[getattr(Contact, c) for c in BASE_COLUMNS]).order_by(Contact.id)
    if contact_ids is not None:
        query = query.where(Contact.id.in_(contact_ids))
    names: dict[str, None] = {}
    with reader() as connection:
        for row in connection.execution_options(yield_per=batch).execute(query):
            for name in row.attributes or {}:
                names.setdefault(name)
    attributes = sorted(names)
    writer = csv.writer(out)
    writer.writerow([*BASE_COLUMNS, *(safe_cell(a) for a in attributes)])
    count = 0
    with reader() as connection:
        for row in connection.execution_options(yield_per=batch).execute(query):
            values = row.attributes or {}
            writer.writerow(
                [*(_cell(getattr(row, c)) for c in BASE_COLUMNS), *(_cell(values.get(a)) for a in attributes)]
            )
            count += 1
    return count
