"""Contact imports on SQLite and PostgreSQL: bad rows reported, good rows in, re-runs idempotent, memory bounded."""

from __future__ import annotations

import csv
import io
import json
import time
import tracemalloc

import pytest
from sqlalchemy import func, select

from smartmail.audience import contacts, imports
from smartmail.audience.contacts import InvalidInput
from smartmail.audience.imports import writer
from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, ImportJob, ImportRowError, ListMembership, Suppression
from smartmail.store.sql.contact_rows import PostgresContactRows, SqliteContactRows
from tests.conftest import wait_for

BAD_KINDS = ("invalid", "missing", "duplicate", "undecodable", "columns")
HEADER = b"email,first_name,age,vip,signup,plan\r\n"


def generate_csv(path, rows: int, bad_every: int = 100) -> dict[int, str]:
    """A CSV with one bad row in `bad_every`, cycling through every kind; returns {row number: kind}
    (the header is row 1). Written in binary so a row can carry bytes that are not UTF-8."""
    bad: dict[int, str] = {}
    with path.open("wb") as out:
        out.write(HEADER)
        for i in range(rows):
            row_no = i + 2
            email = f"user{i}@example{i % 13}.org"
            cells = [
                email.encode(),
                f"Name{i}".encode(),
                str(20 + i % 60).encode(),
                b"yes" if i % 3 == 0 else b"no",
                f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}".encode(),
                [b"free", b"pro", b"team"][i % 3],
            ]
            if i % bad_every == bad_every // 2:
                kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
                bad[row_no] = kind
                if kind == "invalid":
                    cells[0] = f"user{i}.example.org".encode()
                elif kind == "missing":
                    cells[0] = b""
                elif kind == "duplicate":
                    cells[0] = f"USER{i - 1}@example{(i - 1) % 13}.org".encode()  # the row before, in capitals
                elif kind == "undecodable":
                    cells[1] = b"Na\xff\xfeme"
                else:
                    cells = cells[:4]
            out.write(b",".join(cells) + b"\r\n")
    return bad


REASON = {
    "invalid": ("email", "is not a valid email address"),
    "missing": ("email", "missing email address"),
    "duplicate": ("email", "duplicate of"),
    "undecodable": ("first_name", "undecodable bytes"),
    "columns": ("(row)", "expected 6 columns, found 4"),
}
TYPES = {"age": "integer", "vip": "boolean", "signup": "date"}


def report_rows(job_id: str) -> list[dict[str, str]]:
    buffer = io.StringIO()
    imports.write_error_report(job_id, buffer)
    buffer.seek(0)
    return list(csv.DictReader(buffer))


def count(model) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model))


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("imports") / "contacts.csv"
    return path, generate_csv(path, 100_000)


def test_100k_rows_with_every_kind_of_bad_row(env, big_csv):
    path, bad = big_csv
    contacts.create_list("customers")
    started = time.perf_counter()
    job_id = imports.create_job(path, list="customers", types=TYPES)
    status = imports.run_job(job_id)
    elapsed = time.perf_counter() - started
    good = 100_000 - len(bad)
    assert status["state"] == "done"
    assert (status["created"], status["updated"], status["failed"]) == (good, 0, len(bad)), status
    assert count(Contact) == good
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(ListMembership)) == good
        ann = session.scalar(select(Contact).where(Contact.email == "user3@example3.org"))
        assert ann.attributes == {"first_name": "Name3", "age": 23, "vip": True, "signup": "2024-04-04", "plan": "free"}
        assert ann.status == "subscribed" and ann.source == "import"
    report = report_rows(job_id)
    assert {int(r["row"]): r for r in report}.keys() == bad.keys()
    for row in report:
        field, reason = REASON[bad[int(row["row"])]]
        assert row["field"] == field and reason in row["reason"], row
    assert {kind for kind in bad.values()} == set(BAD_KINDS)
    print(f"100k rows imported in {elapsed:.1f} s")

    # The same file again, as a new job: nothing new, every good row an update, the same bad rows.
    again = imports.run_job(imports.create_job(path, list="customers", types=TYPES))
    assert (again["created"], again["updated"], again["failed"]) == (0, good, len(bad))
    assert count(Contact) == good and count(ListMembership) == good


def test_a_job_killed_midway_resumes_without_duplicates(env, tmp_path):
    path = tmp_path / "c.csv"
    bad = generate_csv(path, 5000, bad_every=50)
    job_id = imports.create_job(path, batch_size=700, types=TYPES)

    class Killed(Exception):
        pass

    def die_after_three_batches(status):
        if status["rows_done"] > 2000:
            raise Killed

    with pytest.raises(Killed):
        imports.run_job(job_id, on_progress=die_after_three_batches)
    halfway = imports.job_status(job_id)
    assert 2000 < halfway["rows_done"] < 5001 and count(Contact) < 5000 - len(bad)
    status = imports.run_job(job_id)  # what a redelivered task does
    assert status["state"] == "done"
    assert (status["created"], status["failed"]) == (5000 - len(bad), len(bad))
    assert count(Contact) == 5000 - len(bad)
    assert count(ImportRowError) == len(bad)
    assert {int(r["row"]) for r in report_rows(job_id)} == bad.keys()
    assert imports.run_job(job_id)["created"] == 5000 - len(bad)  # a finished job does nothing


def test_an_address_repeated_in_the_next_batch_is_reported_not_written_twice(env, tmp_path, monkeypatch):
    # On PostgreSQL two batches are written at once, and neither sees the other's rows: slow
    # writes make sure each batch is still uncommitted while the next one looks its addresses up.
    def slowed(real_upsert):
        def slow_upsert(*args, **kwargs):
            real_upsert(*args, **kwargs)
            time.sleep(0.05)

        return slow_upsert

    for rows in (PostgresContactRows, SqliteContactRows):
        monkeypatch.setattr(rows, "upsert", slowed(rows.upsert))
    path = tmp_path / "c.csv"
    lines, n, repeated = [], 0, []
    for batch in range(6):  # batches of 10 rows; each after the first opens with an address of one of the two before
        if batch:
            earlier = n - 13 if batch % 2 == 0 else n - 3
            lines.append(f"U{earlier}@Example.org,again")
            repeated.append(f"u{earlier}@example.org")
        while len(lines) < 10 * (batch + 1):
            lines.append(f"u{n}@example.org,N{n}")
            n += 1
    path.write_text("email,first_name\n" + "\n".join(lines) + "\n")
    status = imports.run_job(imports.create_job(path, batch_size=10))
    assert (status["created"], status["failed"]) == (55, 5)
    assert count(Contact) == 55
    errors = report_rows(status["job_id"])
    assert {(e["field"], e["value"]) for e in errors} == {("email", e) for e in repeated}
    assert all(e["reason"].startswith("duplicate of") for e in errors)
    with session_scope() as session:
        names = dict(session.execute(select(Contact.email, Contact.attributes["first_name"].as_string())).all())
    assert all(name.startswith("N") for name in names.values())  # the first row of an address wins


def test_a_batch_that_fails_stops_the_import_at_the_batch_before(env, tmp_path, monkeypatch):
    path = tmp_path / "c.csv"
    generate_csv(path, 1000, bad_every=10_000)
    job_id = imports.create_job(path, batch_size=100)
    real_write = writer.write_batch

    def third_fails(connection, job_id, records, *args, **kwargs):
        if records[0].row == 202:  # rows 202-301: the third batch
            raise RuntimeError("disk full")
        return real_write(connection, job_id, records, *args, **kwargs)

    monkeypatch.setattr(writer, "write_batch", third_fails)
    with pytest.raises(RuntimeError, match="disk full"):
        imports.run_job(job_id)
    status = imports.job_status(job_id)
    # Nothing after the failed batch is committed, even the one written beside it.
    assert status["state"] == "failed" and status["rows_done"] == 201 and count(Contact) == 200
    monkeypatch.setattr(writer, "write_batch", real_write)
    status = imports.run_job(job_id)
    assert (status["state"], status["created"], status["failed"]) == ("done", 1000, 0) and count(Contact) == 1000


def test_a_second_run_of_the_same_job_cannot_commit_the_same_rows(env, tmp_path):
    path = tmp_path / "c.csv"
    generate_csv(path, 300, bad_every=1000)
    job_id = imports.create_job(path, batch_size=100)
    with session_scope() as session:
        session.get(ImportJob, job_id).rows_done = 101  # another run moved the checkpoint meanwhile
    # This run read the checkpoint before the move: its first commit finds it moved and stops.
    records = [
        item for _, item, _ in imports.read_csv(path, imports.ImportOptions(**imports.job_status(job_id)["options"]))
    ]
    with pytest.raises(imports.JobGone):
        writer.commit_batch(job_id, 0, 101, 0, records[:100], [], imports.ImportOptions(), None)
    assert count(Contact) == 0


def test_a_large_file_is_streamed_in_bounded_memory(env, tmp_path):
    path = tmp_path / "wide.csv"
    rows = 100_000
    filler = "x" * 2500  # a wide column nobody imports makes a file of ~250 MB
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,name,notes\n")
        for i in range(rows):
            out.write(f"wide{i}@example.org,N{i},{filler}\n")
    size = path.stat().st_size
    assert size > 250_000_000
    job_id = imports.create_job(path, mapping={"notes": "ignore"}, batch_size=2000)
    tracemalloc.start()
    try:
        status = imports.run_job(job_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status["created"] == rows
    assert peak < 40_000_000, f"peak {peak / 1e6:.1f} MB while importing a {size / 1e6:.0f} MB file"
    print(f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file")


def test_modes_lists_types_and_suppressions(env, tmp_path):
    contacts.create_list("vip")
    contacts.create_contact("old@example.org", attributes={"keep": 1, "plan": "free"}, timezone="Europe/Paris")
    contacts.create_contact("gone@example.org", status="bounced")
    first = tmp_path / "a.jsonl"
    first.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {
                    "email": "old@example.org",
                    "plan": "pro",
                    "score": 4.5,
                    "tags": ["a", "b"],
                    "attributes": {"vip": True},
                },
                {"email": "new@example.org", "status": "unsubscribed", "locale": "pt-BR", "score": 7},
                {"email": "gone@example.org", "status": "subscribed"},
            ]
        )
        + "\n",
        encoding="utf-8",
    )

    created = imports.run_job(imports.create_job(first, mode="create", list="vip"))
    assert (created["created"], created["skipped"]) == (1, 2)
    assert contacts.get_contact("old@example.org")["attributes"] == {"keep": 1, "plan": "free"}  # untouched

    updated = imports.run_job(imports.create_job(first, mode="update"))
    assert (updated["created"], updated["updated"]) == (0, 3)
    old = contacts.get_contact("old@example.org")
    # JSON types kept, attributes merged, fields not in the file left as they were
    assert old["attributes"] == {"keep": 1, "plan": "pro", "score": 4.5, "tags": ["a", "b"], "vip": True}
    assert old["timezone"] == "Europe/Paris" and old["lists"] == ["vip"]
    new = contacts.get_contact("new@example.org")
    assert new["status"] == "unsubscribed" and new["locale"] == "pt-BR" and new["attributes"] == {"score": 7}
    # An import never resubscribes a suppressed address, and an unsubscribed row is suppressed.
    assert contacts.get_contact("gone@example.org")["status"] == "bounced"
    with session_scope() as session:
        reasons = dict(session.execute(select(Suppression.email, Suppression.reason)).all())
    assert reasons == {"gone@example.org": "hard_bounce", "new@example.org": "unsubscribed"}

    # Nor does it resubscribe an unsubscribed contact whose suppression entry went missing.
    with session_scope() as session:
        session.execute(Suppression.__table__.delete().where(Suppression.email == "new@example.org"))
    again = tmp_path / "again.csv"
    again.write_text("email,status\nnew@example.org,subscribed\nold@example.org,blocked\n", encoding="utf-8")
    imports.run_job(imports.create_job(again))
    assert contacts.get_contact("new@example.org")["status"] == "unsubscribed"
    assert contacts.get_contact("old@example.org")["status"] == "blocked"
    contacts.update_contact("old@example.org", status="subscribed")

    only_update = tmp_path / "b.csv"
    only_update.write_text("email,plan\nnobody@example.org,x\nold@example.org,team\n", encoding="utf-8")
    status = imports.run_job(imports.create_job(only_update, mode="update"))
    assert (status["created"], status["updated"], status["skipped"]) == (0, 1, 1)
    assert contacts.get_contact("nobody@example.org") is None


def test_encodings_delimiters_and_mapping(env, tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes(
        "Courriel;Prénom;Ville\r\nzoe@example.org;Zoé;Besançon\r\n".encode("cp1252") * 1
        + "andre@example.org;André;Orléans\r\n".encode("cp1252")
    )
    status = imports.run_job(imports.create_job(latin, mapping={"Courriel": "email", "Prénom": "first_name"}))
    assert status["created"] == 2 and status["options"]["delimiter"] == ";"
    assert contacts.get_contact("zoe@example.org")["attributes"] == {"first_name": "Zoé", "Ville": "Besançon"}

    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbfE-mail\tTZ\tscore\r\nbom@example.org\tAmerica/New_York\t12\r\n")
    status = imports.run_job(imports.create_job(bom, types={"score": "number"}))
    assert status["created"] == 1 and status["options"]["encoding"] == "utf-8-sig"
    bom_contact = contacts.get_contact("bom@example.org")
    assert bom_contact["timezone"] == "America/New_York" and bom_contact["attributes"] == {"score": 12}

    quoted = tmp_path / "quoted.csv"
    quoted.write_text('email,note\nq@example.org,"line one\nline two, with comma"\nbad-address,"x"\n', encoding="utf-8")
    job_id = imports.create_job(quoted)
    assert imports.run_job(job_id)["created"] == 1
    assert contacts.get_contact("q@example.org")["attributes"]["note"] == "line one\nline two, with comma"
    assert [(r["row"], r["field"]) for r in report_rows(job_id)] == [("3", "email")]


def test_jsonl_bad_lines_are_reported(env, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"email": "a@example.org"}\n{"email": \n[1, 2]\n{"email": "b@example.org", "status": 5}\n'
        b'{"email": "c@example.org", "name": "\xff"}\n\n{"email": "d@example.org", "age": "x"}\n'
        b'{"email": "e@example.org", "name": "\\ud800"}\n{"email": "f@example.org", "score": NaN}\n'
        b'{"email": "g@example.org", "score": 1e400}\n'
    )
    job_id = imports.create_job(path, types={"age": "integer"})
    status = imports.run_job(job_id)
    assert (status["created"], status["failed"]) == (1, 8)
    got = {r["row"]: (r["field"], r["reason"]) for r in report_rows(job_id)}
    assert got["2"][0] == "(row)" and "not valid JSON" in got["2"][1]
    assert got["3"] == ("(row)", "each line must be a JSON object")
    assert got["4"] == ("status", "must be a string")
    assert "undecodable" in got["5"][1]
    assert got["7"][0] == "age" and "not a valid integer" in got["7"][1]
    assert "lone surrogate" in got["8"][1]
    assert got["9"] == ("(row)", "not valid JSON: NaN is not a JSON number")  # Python reads it; databases do not
    assert got["10"] == ("(row)", "not valid JSON: 1e400 is out of range for a number")


BAD_OPTIONS = [
    ({"mode": "merge"}, "mode"),
    ({"format": "xlsx"}, "format"),
    ({"list": "no-such-list"}, "list"),
    ({"mapping": {"Nope": "email"}}, "mapping.Nope"),
    ({"mapping": {"plan": 'bad"name'}}, "mapping.plan"),
    ({"mapping": {"email": "ignore"}}, "mapping"),
    ({"types": {"age": "float128"}}, "types.age"),
    ({"encoding": "klingon-8"}, "encoding"),
    ({"delimiter": "ab"}, "delimiter"),
    ({"batch_size": 0}, "batch_size"),
    ({"surprise": 1}, "options"),
]


@pytest.mark.parametrize("options,field", BAD_OPTIONS, ids=[f for _, f in BAD_OPTIONS])
def test_bad_import_options_name_the_field_and_create_nothing(env, tmp_path, options, field):
    path = tmp_path / "ok.csv"
    path.write_text("email,plan,age\na@example.org,pro,3\n", encoding="utf-8")
    with pytest.raises(InvalidInput) as error:
        imports.create_job(path, **options)
    assert error.value.field == field, str(error.value)
    assert str(error.value).startswith(f"{field}: ")
    assert count(ImportJob) == 0 and count(Contact) == 0


def test_bad_files_name_the_problem(env, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    cases = [(tmp_path / "missing.csv", "path"), (empty, "path")]
    twice = tmp_path / "twice.csv"
    twice.write_text("email,a,a\n", encoding="utf-8")
    cases.append((twice, "header"))
    nomail = tmp_path / "nomail.csv"
    nomail.write_text("name,plan\nx,y\n", encoding="utf-8")
    cases.append((nomail, "mapping"))
    for path, field in cases:
        with pytest.raises(InvalidInput) as error:
            imports.create_job(path)
        assert error.value.field == field, str(error.value)
    assert count(ImportJob) == 0


def test_export_neutralizes_spreadsheet_formulas(env, tmp_path):
    from smartmail.audience import exports

    contacts.create_contact(
        "f@example.org",
        attributes={
            "a": '=HYPERLINK("http://evil")',
            "b": "+1+2",
            "c": "-3",
            "d": "@SUM(A1)",
            "e": "\tx",
            "f": "\r=1",
            "g": "plain",
            "n": -5,
            "flag": True,
            "list": ["=x"],
        },
    )
    buffer = io.StringIO()
    assert exports.export_contacts(buffer) == 1
    buffer.seek(0)
    row = next(csv.DictReader(buffer))
    assert row["a"] == '\'=HYPERLINK("http://evil")' and row["b"] == "'+1+2" and row["c"] == "'-3"
    assert row["d"] == "'@SUM(A1)" and row["e"] == "'\tx" and row["f"] == "'\r=1"
    assert row["g"] == "plain" and row["n"] == "-5" and row["flag"] == "true" and row["list"] == '["=x"]'
    assert row["email"] == "f@example.org"


@pytest.mark.integration
def test_import_runs_on_a_worker_of_the_imports_queue(env, tmp_path, start_worker):
    path = tmp_path / "c.csv"
    bad = generate_csv(path, 3000, bad_every=100)
    contacts.create_list("from-worker")
    worker = start_worker(concurrency=1, queues="imports")
    job_id = imports.start_import(path, list="from-worker", types=TYPES, batch_size=1000)
    status = wait_for(
        lambda: (s := imports.job_status(job_id))["state"] in ("done", "failed") and s,
        120,
        interval=0.2,
        message="import job finished",
    )
    assert status["state"] == "done", (status, worker.output())
    assert (status["created"], status["failed"]) == (3000 - len(bad), len(bad))
    assert count(Contact) == 3000 - len(bad) and count(ListMembership) == 3000 - len(bad)
    assert "smartmail.imports.run" in worker.output()


def test_a_duplicate_names_the_first_row_however_far_back_and_after_a_resume(env, tmp_path):
    path = tmp_path / "c.csv"
    lines = [f"u{i}@example.org,N{i}" for i in range(100)]
    lines[60] = "U3@Example.org,again"  # many batches after row 5 (u3)
    lines[95] = "u70@example.org,again"  # after the resume below, first seen before its checkpoint
    path.write_text("email,first_name\n" + "\n".join(lines) + "\n")
    job_id = imports.create_job(path, batch_size=7)

    class Killed(Exception):
        pass

    def die_past_row_80(status):
        if status["rows_done"] > 80:
            raise Killed

    with pytest.raises(Killed):
        imports.run_job(job_id, on_progress=die_past_row_80)
    assert imports.job_status(job_id)["state"] == "failed"
    status = imports.run_job(job_id)
    assert (status["state"], status["created"], status["failed"]) == ("done", 98, 2)
    assert {(int(e["row"]), e["reason"]) for e in report_rows(job_id)} == {
        (62, "duplicate of row 5"),
        (97, "duplicate of row 72"),
    }


def test_cli_inline_import_prints_its_job_id_first_and_imports_lists_the_jobs(env, tmp_path):
    from typer.testing import CliRunner

    from smartmail.cli.main import app as cli

    runner = CliRunner()
    path = tmp_path / "people.csv"
    generate_csv(path, 3000, bad_every=10_000)
    result = runner.invoke(cli, ["contacts", "import", str(path), "--inline", "--batch-size", "1000"])
    assert result.exit_code == 0, result.output
    done_id = imports.list_jobs(1)[0]["job_id"]
    first = result.output.splitlines()[0]
    assert first.startswith(f"import job {done_id} started") and f"import-resume {done_id} --inline" in first

    # A run killed midway stays `running` with its checkpoint; the listing shows where it got to.
    killed_id = imports.create_job(path, batch_size=100)

    def killed(status):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imports.run_job(killed_id, on_progress=killed)
    listed = runner.invoke(cli, ["contacts", "imports", "--json"])
    assert listed.exit_code == 0, listed.output
    jobs = {job["job_id"]: job for job in json.loads(listed.stdout)}
    assert jobs[done_id]["state"] == "done" and jobs[done_id]["progress"] == "100%"
    # (On PostgreSQL the batches written beside the first one commit too.)
    assert jobs[killed_id]["state"] == "running" and 101 <= jobs[killed_id]["rows_done"] < 3001
    assert 0 < int(jobs[killed_id]["progress"].rstrip("%")) < 100
    table = runner.invoke(cli, ["contacts", "imports"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "people.csv" in table.output and "import-resume" in table.output
    assert next(line for line in table.output.splitlines() if killed_id in line).split("│")[2].strip() == "running"
    assert [
        j["job_id"] for j in json.loads(runner.invoke(cli, ["contacts", "imports", "--json", "--state", "done"]).stdout)
    ] == [done_id]

    resumed = runner.invoke(cli, ["contacts", "import-resume", killed_id, "--inline"])
    assert resumed.exit_code == 0, resumed.output
    assert imports.job_status(killed_id)["state"] == "done"
    bad = runner.invoke(cli, ["contacts", "imports", "--state", "stuck"])
    assert bad.exit_code == 2 and "state: " in bad.output
