"""Contact rows written in bulk (imports): session settings, look-ups, upserts with list joins, suppressions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from smartmail.store import dialect
from smartmail.store.engine import COPY_SPECIAL, insert_else_upsert, utcnow

Row = tuple[str, str, str | None, str | None, str]  # email, status, timezone, locale, attributes as JSON text
Known = dict[str, tuple[str | None, str]]  # email -> (last_import_id, status)

# In create-only mode known addresses are left alone, except for the mark that says this job saw them.
_MARK_ONLY_SET = "last_import_id = excluded.last_import_id"


class ContactRows(Protocol):
    """One import batch's statements, run in the caller's transaction on `bind`."""

    concurrent_batches: bool  # whether batches may be written at once, each on its own connection

    def begin_batch(self) -> None:
        """Session settings for the batch's transaction."""

    def known(self, emails: list[str]) -> tuple[Known, dict[str, str]]:
        """({email: (last_import_id, status)} of known contacts, {email: suppression reason})."""

    def upsert(
        self, rows: list[Row], *, job_id: str, source: str, create_only: bool, list_id: int | None, all_new: bool
    ) -> None:
        """Insert or update the rows (attributes merge; an empty field leaves the stored one), marked
        with the job; join them to the list, if any. `all_new`: none was known at the look-up."""

    def suppress(self, pairs: list[tuple[str, str]]) -> None:
        """(email, reason) suppressions from an import; existing ones stay as they are."""


def for_bind(bind: Any) -> ContactRows:
    """The implementation for the dialect of `bind` (an Engine, Connection or Session)."""
    return PostgresContactRows(bind) if dialect.is_postgresql(bind) else SqliteContactRows(bind)


# --- PostgreSQL ------------------------------------------------------------------------------------

_PG_STAGING = """CREATE TEMP TABLE IF NOT EXISTS smartmail_import_staging (
    email text, status text, timezone text, locale text, attributes jsonb) ON COMMIT DELETE ROWS"""
# One INSERT … ON CONFLICT per batch. Attributes merge (a file's attributes add to and override
# what is stored); an empty cell or absent key leaves the stored field as it was.
_PG_UPSERT_SET = """status = EXCLUDED.status, timezone = COALESCE(EXCLUDED.timezone, contacts.timezone),
        locale = COALESCE(EXCLUDED.locale, contacts.locale), attributes = contacts.attributes || EXCLUDED.attributes,
        updated_at = EXCLUDED.updated_at, last_import_id = EXCLUDED.last_import_id"""
# COPY text format: backslash, tab, newline and carriage return are escaped; \N is NULL.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL, _BS, _BS2 = "\\N", "\\", "\\\\"


def _copy_line(row: tuple) -> str:
    return "\t".join("\\N" if v is None else v.translate(_COPY_ESCAPES) for v in row) + "\n"


def _copy_text(rows: list[Row]) -> str:
    """The batch's (email, status, timezone, locale, attributes JSON) rows as COPY text.

    str.translate on every field would be most of the Python time of a PostgreSQL import, and the
    validated fields almost never need it: the text fields are checked in one search over the
    whole batch, and the JSON (ASCII, its control characters escaped by the encoder) only ever
    needs its backslashes doubled."""
    if COPY_SPECIAL.search("".join([f"{e}{t or ''}{lo or ''}" for e, _, t, lo, _ in rows])):
        return "".join(map(_copy_line, rows))
    return "".join([f"{e}\t{s}\t{t or _NULL}\t{lo or _NULL}\t{a.replace(_BS, _BS2)}\n" for e, s, t, lo, a in rows])


def _pg_text_array(values: list[str]) -> str:
    """A text[] literal built in one join: psycopg's list adapter is slow per element.
    Validated addresses never hold a quote or backslash, so escaping is almost never needed."""
    everything = "".join(values)
    if '"' not in everything and "\\" not in everything:
        return '{"' + '","'.join(values) + '"}' if values else "{}"
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


class PostgresContactRows:
    """See `ContactRows`: COPY into a staging table, then one INSERT … SELECT … ON CONFLICT."""

    # One server process alone is the bottleneck of an import here, and other cores would idle.
    concurrent_batches = True

    def __init__(self, bind: Any) -> None:
        self.bind = bind

    def begin_batch(self) -> None:
        # A batch commits with its checkpoint, so one lost in a server crash is imported again
        # by the re-run; the job's final commit is synchronous and makes every batch durable.
        self.bind.exec_driver_sql("SET LOCAL synchronous_commit = off")

    def known(self, emails: list[str]) -> tuple[Known, dict[str, str]]:
        cursor = self.bind.connection.driver_connection.cursor()
        array = _pg_text_array(emails)
        # Index look-ups whatever the statistics say: while a new or truncated table is being
        # loaded its statistics lag behind and the planner picks a sequential scan of millions of
        # rows per batch.
        # One query for both tables: cheaper than two `= ANY(array)` look-ups.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(
            "SELECT b.email, c.id IS NOT NULL, c.last_import_id, c.status, s.reason "
            "FROM unnest(%s::text[]) b(email) LEFT JOIN contacts c ON c.email = b.email "
            "LEFT JOIN suppressions s ON s.email = b.email WHERE c.id IS NOT NULL OR s.email IS NOT NULL",
            (array,),
        )
        rows = cursor.fetchall()
        cursor.execute("SET LOCAL enable_seqscan = DEFAULT")
        known = {email: (mark, status) for email, is_contact, mark, status, _ in rows if is_contact}
        return known, {email: reason for email, _, _, _, reason in rows if reason is not None}

    def upsert(
        self, rows: list[Row], *, job_id: str, source: str, create_only: bool, list_id: int | None, all_new: bool
    ) -> None:
        now = utcnow()
        set_clause = _MARK_ONLY_SET if create_only else _PG_UPSERT_SET
        # COPY into a session-local staging table, then one INSERT … SELECT … ON CONFLICT: COPY
        # loads several times faster than executemany.
        cursor = self.bind.connection.driver_connection.cursor()
        cursor.execute(_PG_STAGING)
        with cursor.copy(
            "COPY smartmail_import_staging (email, status, timezone, locale, attributes) FROM STDIN"
        ) as copy:
            copy.write(_copy_text(rows))  # one write: cheaper than write_row per row
        insert = (
            "INSERT INTO contacts (email, status, timezone, locale, attributes, source, created_at, updated_at, "
            "last_import_id) SELECT email, status, timezone, locale, attributes, %(source)s, %(now)s, %(now)s, "
            "%(job)s FROM smartmail_import_staging"
        )
        upsert = f"{insert} ON CONFLICT (email) DO UPDATE SET {set_clause}"
        params = {"source": source, "now": now, "job": job_id}
        if list_id is not None:
            # The upserted ids join the list in the same statement: no second look-up by email.
            # ON CONFLICT DO NOTHING: someone who left the list stays off it.
            params.update(list=list_id, member_source=f"import:{job_id}")
            # (New contacts cannot be members yet, so their memberships need no ON CONFLICT either.)
            insert, upsert = (
                (
                    f"WITH upserted AS ({statement} RETURNING id) INSERT INTO list_memberships "
                    "(list_id, contact_id, status, joined_at, source) SELECT %(list)s, id, 'subscribed', "
                    f"%(now)s, %(member_source)s FROM upserted{conflict}"
                )
                for statement, conflict in ((insert, ""), (upsert, " ON CONFLICT DO NOTHING"))
            )
        if all_new:
            # Every address was unknown a moment ago; a concurrent writer may have added one since.
            insert_else_upsert(cursor, insert, upsert, params)
        else:
            cursor.execute(upsert, params)
        # the staging rows go at COMMIT

    def suppress(self, pairs: list[tuple[str, str]]) -> None:
        now = utcnow()
        cursor = self.bind.connection.driver_connection.cursor()
        cursor.executemany(
            "INSERT INTO suppressions (email, reason, detail, created_at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (email) DO NOTHING",
            [(e, r, "import", now) for e, r in pairs],
        )


# --- SQLite ----------------------------------------------------------------------------------------

_SQLITE_CACHE_KB = 128 * 1024
_SQLITE_UPSERT_SET = """status = excluded.status, timezone = COALESCE(excluded.timezone, contacts.timezone),
        locale = COALESCE(excluded.locale, contacts.locale),
        attributes = json_patch(contacts.attributes, excluded.attributes),
        updated_at = excluded.updated_at, last_import_id = excluded.last_import_id"""
_SQLITE_CHUNK = 30000  # SQLite allows 32,766 parameters per statement


def _sqlite_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's own SQLite DateTime format


class SqliteContactRows:
    """See `ContactRows`: executemany, and the list joined by a second statement."""

    concurrent_batches = False  # one writer at a time in SQLite anyway

    def __init__(self, bind: Any) -> None:
        self.bind = bind

    def begin_batch(self) -> None:
        # SQLite's default page cache is 2 MB: past a few hundred thousand contacts the email
        # index no longer fits and every look-up and insert reads pages through the OS.
        self.bind.exec_driver_sql(f"PRAGMA cache_size = -{_SQLITE_CACHE_KB}")

    def known(self, emails: list[str]) -> tuple[Known, dict[str, str]]:
        known, suppressed = {}, {}
        for start in range(0, len(emails), _SQLITE_CHUNK):
            chunk = emails[start : start + _SQLITE_CHUNK]
            marks = ",".join("?" * len(chunk))
            cursor = self.bind.exec_driver_sql(
                f"SELECT email, last_import_id, status FROM contacts WHERE email IN ({marks})", tuple(chunk)
            )
            known.update({email: (mark, status) for email, mark, status in cursor})
            cursor = self.bind.exec_driver_sql(
                f"SELECT email, reason FROM suppressions WHERE email IN ({marks})", tuple(chunk)
            )
            suppressed.update(dict(cursor.fetchall()))
        return known, suppressed

    def upsert(
        self, rows: list[Row], *, job_id: str, source: str, create_only: bool, list_id: int | None, all_new: bool
    ) -> None:
        set_clause = _MARK_ONLY_SET if create_only else _SQLITE_UPSERT_SET
        stamp = _sqlite_time(utcnow())
        values = [(*row, source, stamp, stamp, job_id) for row in rows]
        insert = (
            "INSERT INTO contacts (email, status, timezone, locale, attributes, source, created_at, updated_at, "
            "last_import_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        # No savepoint needed for a plain INSERT here: SQLite writers are serialized (BEGIN IMMEDIATE),
        # so no address can have appeared since the batch's look-up.
        self.bind.exec_driver_sql(
            insert if all_new else f"{insert} ON CONFLICT (email) DO UPDATE SET {set_clause}", values
        )
        if list_id is not None:
            self._join(list_id, [row[0] for row in rows], f"import:{job_id}")

    def _join(self, list_id: int, emails: list[str], source: str) -> None:
        """The batch's contacts join the list (ON CONFLICT DO NOTHING: leavers stay off)."""
        now = utcnow()
        for start in range(0, len(emails), _SQLITE_CHUNK):
            chunk = emails[start : start + _SQLITE_CHUNK]
            self.bind.exec_driver_sql(
                "INSERT INTO list_memberships (list_id, contact_id, status, joined_at, source) "
                f"SELECT ?, id, 'subscribed', ?, ? FROM contacts WHERE email IN ({','.join('?' * len(chunk))}) "
                "ON CONFLICT DO NOTHING",
                (list_id, _sqlite_time(now), source, *chunk),
            )

    def suppress(self, pairs: list[tuple[str, str]]) -> None:
        now = utcnow()
        self.bind.exec_driver_sql(
            "INSERT INTO suppressions (email, reason, detail, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (email) DO NOTHING",
            [(e, r, "import", _sqlite_time(now)) for e, r in pairs],
        )
