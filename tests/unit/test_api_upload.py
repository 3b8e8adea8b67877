"""The /v1/imports upload reader without a server: streamed to a file however the body is cut; limits; bad forms."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect

from smartmail.errors import InvalidInput
from smartmail.web.api.imports import (
    MAX_FIELD_BYTES,
    Upload,
    UploadRefused,
    _form_field,
    job_options,
    receive_upload,
)

BOUNDARY = "b0undary-1234"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
# Data that looks like a boundary without being one, and bytes that are not text.
AWKWARD = b"email\r\na@example.org\r\n--b0undary-12\r\n\r\n--b0undar\xff\xfe\x00" * 50


def form(*parts: tuple[str, bytes, str | None], close: bool = True) -> bytes:
    """A multipart/form-data body: (name, value, filename or None) per part."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            body += b"Content-Type: text/csv\r\n"
        body += b"\r\n" + value + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


async def _chunks(body: bytes, size: int):
    for start in range(0, len(body), size):
        yield body[start : start + size]


def receive(body: bytes, directory, *, size: int = 65536, max_bytes: int = 10**9, content_type=CONTENT_TYPE) -> Upload:
    return asyncio.run(receive_upload(_chunks(body, size), content_type, directory, max_bytes))


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 700))
def test_the_file_arrives_byte_for_byte_however_the_body_is_cut(tmp_path_factory, size):
    directory = tmp_path_factory.mktemp("uploads")
    body = form(("list", b"customers", None), ("file", AWKWARD, "c.csv"), ("map", b"E-Mail=email", None))
    upload = receive(body, directory, size=size)
    assert upload.path.read_bytes() == AWKWARD
    assert upload.filename == "c.csv" and upload.content_type == "text/csv"
    assert upload.fields == {"list": ["customers"], "map": ["E-Mail=email"]}
    assert files_in(directory) == [upload.path.name]  # renamed: no temporary file left


def test_a_file_name_loses_its_directories_and_control_characters(tmp_path):
    upload = receive(form(("file", b"x", "C:\\Users\\ann\\list\x07.csv")), tmp_path)
    assert upload.filename == "list.csv"
    upload = receive(form(("file", b"x", "../../etc/café.csv")), tmp_path)
    assert upload.filename == "café.csv"


@pytest.mark.parametrize("size", [1, 1000, 65536])
def test_past_the_limit_the_read_stops_and_nothing_is_left(tmp_path, size):
    body = form(("file", b"x" * 5000, "c.csv"))
    with pytest.raises(UploadRefused) as refused:
        receive(body, tmp_path, size=size, max_bytes=4096)
    assert refused.value.status == 413 and refused.value.extensions == {"max_bytes": 4096}
    assert files_in(tmp_path) == []
    assert receive(body, tmp_path, max_bytes=len(body)).path.stat().st_size == 5000  # exactly the limit is fine


@pytest.mark.parametrize(
    "body,content_type,status",
    [
        (form(("file", b"x", "c.csv"), close=False), CONTENT_TYPE, 400),  # cut short
        (b"not multipart at all", CONTENT_TYPE, 400),
        (b'{"file": "x"}', "application/json", 415),
        (form(("file", b"x", "c.csv")), "multipart/form-data", 415),  # no boundary
        (form(("file", b"x", "c.csv")), f"multipart/form-data; boundary={'b' * 300}", 400),
        (b"--b0undary-1234\r\nContent-Type: text/csv\r\n\r\nx\r\n--b0undary-1234--\r\n", CONTENT_TYPE, 400),
    ],
)
def test_a_body_that_is_not_a_form_is_refused(tmp_path, body, content_type, status):
    with pytest.raises(UploadRefused) as refused:
        receive(body, tmp_path, content_type=content_type)
    assert refused.value.status == status
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "parts,field",
    [
        ((("file", b"x", "c.csv"), ("colour", b"red", None)), "colour"),
        ((("file", b"x", "c.csv"), ("file", b"y", "d.csv")), "file"),
        ((("mode", b"create", None), ("mode", b"update", None), ("file", b"x", "c.csv")), "mode"),
        ((("list", b"x" * (MAX_FIELD_BYTES + 1), None), ("file", b"x", "c.csv")), "list"),
        ((("list", b"\xff", None), ("file", b"x", "c.csv")), "list"),
        ((("list", b"customers", None),), "file"),
    ],
)
def test_a_bad_form_field_is_named_and_nothing_is_left(tmp_path, parts, field):
    with pytest.raises(InvalidInput) as error:
        receive(form(*parts), tmp_path)
    assert error.value.field == field
    assert files_in(tmp_path) == []


def test_a_client_that_goes_away_leaves_nothing(tmp_path):
    async def interrupted():
        yield form(("file", b"x" * 1000, "c.csv"))[:500]
        raise ClientDisconnect()

    with pytest.raises(ClientDisconnect):
        asyncio.run(receive_upload(interrupted(), CONTENT_TYPE, tmp_path, 10**6))
    assert files_in(tmp_path) == []


def test_form_fields_become_the_cli_options(tmp_path):
    upload = Upload(
        tmp_path / "x.upload",
        "people.ndjson",
        "",
        {
            "list": ["vip"],
            "batch_size": [" 200 "],
            "map": ["E-Mail=email", "Age=age"],
            "type": ["age=integer"],
            "delimiter": [""],
        },  # fmt: skip
    )
    assert job_options(upload) == {
        "list": "vip",
        "batch_size": 200,
        "mapping": {"E-Mail": "email", "Age": "age"},
        "types": {"age": "integer"},
        "format": "jsonl",
        "upload_name": "people.ndjson",
    }
    assert job_options(Upload(tmp_path / "x", "", "text/csv", {}))["format"] == "csv"
    assert job_options(Upload(tmp_path / "x", "data.bin", "", {"format": ["csv"]}))["format"] == "csv"


@pytest.mark.parametrize(
    "filename,fields,field",
    [
        ("data.bin", {}, "format"),
        ("c.csv", {"batch_size": ["many"]}, "batch_size"),
        ("c.csv", {"batch_size": ["１０"]}, "batch_size"),  # digits, but not ASCII ones
        ("c.csv", {"map": ["E-Mail"]}, "map"),
        ("c.csv", {"type": ["age:integer"]}, "type"),
    ],
)
def test_bad_options_name_the_form_field(tmp_path, filename, fields, field):
    with pytest.raises(InvalidInput) as error:
        job_options(Upload(tmp_path / "x", filename, "", fields))
    assert error.value.field == field


def test_domain_option_names_become_form_field_names():
    assert _form_field(InvalidInput("bad", field="mapping.E-Mail")).field == "map.E-Mail"
    assert _form_field(InvalidInput("bad", field="types.age")).field == "type.age"
    assert _form_field(InvalidInput("bad", field="header")).field == "file"
    assert _form_field(InvalidInput("bad", field="list")).field == "list"


@settings(max_examples=120, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from(
            [
                f"--{BOUNDARY}\r\n".encode(),
                f"--{BOUNDARY}--\r\n".encode(),
                b'Content-Disposition: form-data; name="file"; filename="c.csv"\r\n',
                b'Content-Disposition: form-data; name="list"\r\n',
                b"Content-Disposition: form-data\r\n",
                b"Content-Type: text/csv\r\n",
                b"\r\n",
                b"email\r\na@example.org",
                b"\xff\x00",
            ]
        )
        | st.binary(max_size=40),
        max_size=30,
    ),
    size=st.integers(1, 64),
)
def test_any_body_is_an_upload_or_a_refusal_and_leaves_at_most_the_upload(tmp_path_factory, pieces, size):
    directory = tmp_path_factory.mktemp("uploads")
    try:
        upload = receive(b"".join(pieces), directory, size=size, max_bytes=600)
    except (UploadRefused, InvalidInput):
        assert files_in(directory) == []
    else:
        assert files_in(directory) == [upload.path.name]
