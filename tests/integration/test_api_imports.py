"""/v1/imports through a real `smartmail web` process: uploads run by an imports worker, bad forms, limits, memory."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from smartmail.audience import contacts
from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, ContactList, ImportJob, ListMembership
from tests.conftest import wait_for

GOOD_CSV = (
    b"E-Mail,first_name,age\r\n"
    b"ann@example.org,Ann,41\r\n"
    b"not-an-address,Bob,30\r\n"
    b"cy@example.org,Cy,x\r\n"
    b"dee@example.org,Dee,29\r\n"
)


def upload_dir() -> Path:
    return Path(os.environ["SMARTMAIL_API_UPLOAD_DIR"])


def left_in_upload_dir() -> set[str]:
    directory = upload_dir()
    return set(os.listdir(directory)) if directory.exists() else set()


def jobs() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(ImportJob)) or 0


def post_import(client, content: bytes, filename: str = "people.csv", content_type: str = "text/csv", **fields):
    return client.post("/v1/imports", files={"file": (filename, content, content_type)}, data=fields)


def finished(client, job_id: str, worker) -> dict:
    def done():
        job = client.get(f"/v1/imports/{job_id}").json()
        return job if job["state"] in ("done", "failed") else None

    return wait_for(done, 60, interval=0.1, message=lambda: worker.output()[-3000:])


def test_an_upload_is_imported_by_a_worker_of_the_imports_queue(api, shared_worker):
    worker = shared_worker(concurrency=1, queues="imports")
    contacts.create_list("customers")
    client = api.client("contacts:write", "contacts:read")
    response = post_import(client, GOOD_CSV, list="customers", map="E-Mail=email", type="age=integer")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/imports/{job['id']}"
    assert job["filename"] == "people.csv" and job["state"] in ("pending", "running", "done")
    assert job["options"]["list"] == "customers" and job["options"]["mapping"] == {"E-Mail": "email"}
    assert job["total_bytes"] == len(GOOD_CSV)

    job = finished(client, job["id"], worker)
    assert job["state"] == "done", job
    assert (job["created"], job["updated"], job["failed"]) == (2, 0, 2)
    with session_scope() as session:
        stored = {c.email: c.attributes for c in session.scalars(select(Contact))}
        members = session.scalars(
            select(Contact.email).join(ListMembership).join(ContactList).where(ContactList.name == "customers")
        ).all()
        path = Path(session.get(ImportJob, job["id"]).path)
    assert stored == {
        "ann@example.org": {"first_name": "Ann", "age": 41},
        "dee@example.org": {"first_name": "Dee", "age": 29},
    }
    assert sorted(members) == ["ann@example.org", "dee@example.org"]
    assert path.parent == upload_dir() and not path.exists()  # the uploaded file is gone once done

    report = client.get(f"/v1/imports/{job['id']}/errors")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(report.text)))
    assert [(r["row"], r["field"]) for r in rows] == [("3", "email"), ("4", "age")]

    # JSON Lines, its format told by the file name; an update of a contact just imported.
    lines = b'{"email": "ann@example.org", "plan": "pro"}\n{"email": "eve@example.org"}\n'
    response = post_import(client, lines, filename="more.jsonl", mode="upsert")
    assert response.status_code == 202, response.text
    job = finished(client, response.json()["id"], worker)
    assert (job["state"], job["created"], job["updated"], job["options"]["format"]) == ("done", 1, 1, "jsonl")
    with session_scope() as session:
        ann = session.scalar(select(Contact).where(Contact.email == "ann@example.org"))
        assert ann.attributes == {"first_name": "Ann", "age": 41, "plan": "pro"}


@pytest.mark.parametrize(
    "filename,fields,pointer",
    [
        ("people.csv", {"list": "no-such-list"}, "/list"),
        ("people.csv", {"map": "E-Mail=ignore"}, "/map"),  # then no column holds the address
        ("people.csv", {"mode": "merge"}, "/mode"),
        ("people.csv", {"format": "xml"}, "/format"),
        ("people.bin", {}, "/format"),
        ("people.csv", {"batch_size": "many"}, "/batch_size"),
        ("people.csv", {"batch_size": "0"}, "/batch_size"),
        ("people.csv", {"map": "E-Mail"}, "/map"),
        ("people.csv", {"type": "age=colour"}, "/type/age"),
        ("people.csv", {"encoding": "zlib"}, "/encoding"),  # a codec, but not a text encoding
        ("people.csv", {"encoding": "utf-16"}, "/encoding"),  # no BOM: the header cannot be read
        ("people.csv", {"encoding": "idna"}, "/encoding"),
        ("people.csv", {"delimiter": "ab"}, "/delimiter"),
        ("people.csv", {"colour": "red"}, "/colour"),
        ("people.csv", {"map": "Phone=email"}, "/map/Phone"),
    ],
)
def test_bad_form_fields_are_422_naming_the_field_and_store_nothing(api, filename, fields, pointer):
    client = api.client("contacts:write")
    before = left_in_upload_dir()
    response = post_import(client, GOOD_CSV, filename, "application/octet-stream", **fields)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["pointer"] == pointer, response.json()
    assert jobs() == 0 and left_in_upload_dir() == before


def test_a_request_that_is_not_an_upload_is_refused(api):
    writer, reader = api.client("contacts:write"), api.client("contacts:read")
    assert writer.post("/v1/imports", json={"file": "x"}).status_code == 415
    no_file = writer.post("/v1/imports", files={"list": (None, b"customers")})
    assert no_file.status_code == 422 and no_file.json()["errors"][0]["pointer"] == "/file"
    cut_short = writer.post(
        "/v1/imports",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\nemail\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert cut_short.status_code == 400
    forbidden = post_import(reader, GOOD_CSV, map="E-Mail=email")
    assert forbidden.status_code == 403 and "contacts:write" in forbidden.json()["detail"]
    assert jobs() == 0


def test_jobs_are_listed_newest_first_page_by_page(api):
    client = api.client("contacts:write", "contacts:read")
    ids = [post_import(client, GOOD_CSV, map="E-Mail=email").json()["id"] for _ in range(3)]
    first = client.get("/v1/imports", params={"limit": 2}).json()
    second = client.get("/v1/imports", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in first["data"] + second["data"]] == ids[::-1] and second["next_cursor"] is None
    assert client.get("/v1/imports", params={"state": "done"}).json()["data"] == []
    assert client.get("/v1/imports", params={"state": "lost"}).status_code == 422
    assert client.get("/v1/imports/01ARZ3NDEKTSV4RRFFQ69G5FAV").status_code == 404
    assert client.get("/v1/imports/01ARZ3NDEKTSV4RRFFQ69G5FAV/errors").status_code == 404
    assert client.get(f"/v1/imports/{ids[0]}/errors").text == "row,field,reason,value\r\n"  # none yet
    for job_id in ids:  # no worker here: the files of these pending jobs are removed by hand
        with session_scope() as session:
            Path(session.get(ImportJob, job_id).path).unlink()


def test_an_idempotent_retry_replays_the_job_instead_of_making_another(api):
    client = api.client("contacts:write")
    first = client.post(
        "/v1/imports",
        files={"file": ("people.csv", GOOD_CSV, "text/csv")},
        data={"map": "E-Mail=email"},
        headers={"Idempotency-Key": "upload-1"},
    )
    again = client.post(  # encoded afresh: another multipart boundary, as a client's retry would draw
        "/v1/imports",
        files={"file": ("people.csv", GOOD_CSV, "text/csv")},
        data={"map": "E-Mail=email"},
        headers={"Idempotency-Key": "upload-1"},
    )
    assert first.status_code == again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert jobs() == 1
    with session_scope() as session:
        Path(session.get(ImportJob, first.json()["id"]).path).unlink()


def rss(pid: int) -> int:
    process = psutil.Process(pid)
    return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))


def test_a_50_mb_upload_leaves_the_web_process_memory_flat(api, _module_web, tmp_path):
    path = tmp_path / "big.csv"
    with path.open("wb") as out:
        out.write(b"email,first_name,notes\n")
        row = 0
        while out.tell() < 50 * 1024 * 1024:
            out.write(b"".join(b"user%d@example.org,Name%d,%s\n" % (row + i, row + i, b"n" * 40) for i in range(5000)))
            row += 5000
    size = path.stat().st_size
    client = api.client("contacts:write")
    assert post_import(client, GOOD_CSV, map="E-Mail=email").status_code == 202  # warm: code loaded, pools open
    pid = _module_web.process.popen.pid
    baseline, peak, sampling = rss(pid), 0, True

    def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        with path.open("rb") as handle:
            response = client.post("/v1/imports", files={"file": ("big.csv", handle, "text/csv")})
    finally:
        sampling = False
        sampler.join()
    elapsed = time.perf_counter() - started
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["total_bytes"] == size
    with session_scope() as session:
        stored = Path(session.get(ImportJob, job["id"]).path)
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
    stored.unlink()
    growth = peak - baseline
    print(f"50 MB upload in {elapsed:.2f} s; web RSS {baseline / 2**20:.1f} MiB, peak +{growth / 2**20:.1f} MiB")
    assert growth < 10 * 2**20, (
        f"the web process grew by {growth / 2**20:.1f} MiB during a {size / 2**20:.0f} MiB upload"
    )


@pytest.fixture
def small_uploads(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_API_MAX_UPLOAD_BYTES", "65536")


def test_over_the_limit_is_413_naming_it_and_nothing_is_left(small_uploads, api):
    client = api.client("contacts:write")
    before = left_in_upload_dir()
    body = b"email\r\n" + b"someone@example.org\r\n" * 5000  # ~100 KB

    def stream():  # no Content-Length: the server counts as the body arrives
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    boundary = "limit-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n\r\n'.encode()

    def chunked():
        yield head
        yield from stream()
        yield f"\r\n--{boundary}--\r\n".encode()

    declared = post_import(client, body)  # with Content-Length: refused before it is read
    counted = client.post(
        "/v1/imports", content=chunked(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    for response in (declared, counted):
        assert response.status_code == 413, response.text
        problem = response.json()
        assert problem["max_bytes"] == 65536 and "65536 bytes" in problem["detail"]
    assert jobs() == 0 and left_in_upload_dir() == before
    assert post_import(client, GOOD_CSV, map="E-Mail=email").status_code == 202  # under it: accepted
