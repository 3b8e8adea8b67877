"""smartmail.client against a real `smartmail web`: a round trip per resource, typed errors, paging, safe retries."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from smartmail.client import Client, Conflict, Forbidden, NotFound, Unauthorized, ValidationFailed
from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, Event, ImportJob, Message, Suppression, Template
from tests.conftest import wait_for


def stored_ids() -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(Message.id)))


class RecordingSleep:
    """time.sleep that remembers each wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


def _read_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message with a Content-Length body (what httpx sends and uvicorn answers here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DroppingProxy:
    """A TCP proxy to the server that, on its first connection, forwards the request, waits for the
    server's whole answer and then closes the client's connection without passing it on: the request
    took effect, the client cannot know. Later connections are forwarded both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.dropped_answers: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            threading.Thread(target=self._drop if first else self._forward, args=(client,), daemon=True).start()

    def _drop(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as upstream:
            upstream.sendall(_read_message(client))
            self.dropped_answers.append(_read_message(upstream))

    def _forward(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(api) -> Iterator[DroppingProxy]:
    host, port = api.url.removeprefix("http://").split(":")
    dropping = DroppingProxy((host, int(port)))
    yield dropping
    dropping.close()


def test_send_read_and_list(api):
    with Client(api.url, api.key("messages:send", "messages:read")) as client:
        sent = [client.messages.send(f"Ann {i} <ann{i}@example.org>", subject="Hi", text="Hello") for i in range(3)]
        assert {s["state"] for s in sent} == {"queued"}
        message = client.messages.get(sent[0]["id"])
        assert (message["recipient"], message["subject"]) == ("Ann 0 <ann0@example.org>", "Hi")
        # One item per page: the iterator follows next_cursor through all three, newest first.
        listed = [m["id"] for m in client.messages.list(page_size=1)]
        assert listed == [s["id"] for s in reversed(sent)]
        assert [m["id"] for m in client.messages.list(to="ANN1@example.org")] == [sent[1]["id"]]
    assert sorted(stored_ids()) == sorted(s["id"] for s in sent)


def test_errors_arrive_typed(api):
    with Client(api.url, api.key("messages:send")) as client:
        with pytest.raises(ValidationFailed) as raised:
            client.messages.send("not an address", subject="s", text="t")
        assert raised.value.errors[0]["pointer"] == "/to" and raised.value.request_id
        with pytest.raises(Forbidden, match="messages:read"):
            client.messages.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    with Client(api.url, "sm_0123456789abcdef_" + "x" * 43) as stranger, pytest.raises(Unauthorized):
        stranger.messages.send("a@example.org", subject="s", text="t")
    assert stored_ids() == []


def test_a_429_is_waited_out_as_retry_after_says(api):
    # One request per second, none back to back: the second send is refused until a second has passed.
    sleep = RecordingSleep()
    with Client(api.url, api.key("messages:send", rate_limit=1, burst=1), sleep=sleep) as client:
        first = client.messages.send("a@example.org", subject="s", text="t")
        second = client.messages.send("b@example.org", subject="s", text="t")
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 1  # the server's Retry-After: 1
    assert sorted(stored_ids()) == sorted([first["id"], second["id"]])


def test_a_send_whose_answer_was_lost_is_retried_and_stored_once(api, proxy):
    sleep = RecordingSleep()
    with Client(proxy.url, api.key("messages:send"), backoff=0.1, sleep=sleep) as client:
        accepted = client.messages.send("a@example.org", subject="s", text="t")
    [dropped] = proxy.dropped_answers
    assert dropped.startswith(b"HTTP/1.1 202")  # the first attempt was sent and answered…
    assert proxy.connections == 2 and len(sleep.waits) >= 1  # …lost, and retried with the same key
    assert stored_ids() == [accepted["id"]]
    assert accepted["id"].encode() in dropped  # the retry was answered with the first outcome


# --- One round trip per resource: the client's requests are the ones the routers take --------------


def rows(model, *where) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def test_templates(api):
    with Client(api.url, api.key("templates:read", "templates:write")) as client:
        first = client.templates.create("welcome", "Hi {{ name }}", "<p>Hi {{ name }}</p>")
        second = client.templates.create("welcome", "Hello {{ name }}", "<p>Hello</p>", text="Hello")
        assert (first["version"], second["version"], second["text"]) == (1, 2, "Hello")
        assert client.templates.get("welcome") == second
        assert client.templates.get("welcome", version=1) == first
        preview = client.templates.preview("welcome", {"name": "<Ann>"}, version=1)
        assert (preview["subject"], preview["html"]) == ("Hi <Ann>", "<p>Hi &lt;Ann&gt;</p>")
        assert [(t["name"], t["version"]) for t in client.templates.list()] == [("welcome", 2)]
        client.templates.delete("welcome")
        with pytest.raises(NotFound):
            client.templates.get("welcome")
    assert rows(Template) == 0


def test_contacts(api):
    with Client(api.url, api.key("contacts:read", "contacts:write")) as client:
        ann, created = client.contacts.upsert("Ann@Example.org", attributes={"plan": "free", "age": 41})
        assert created and ann["email"] == "ann@example.org"
        assert client.contacts.upsert("ann@example.org", attributes={"plan": "pro"})[1] is False
        changed = client.contacts.update("ann@example.org", attributes={"age": None}, timezone="Europe/Paris")
        assert (changed["attributes"], changed["timezone"]) == ({"plan": "pro"}, "Europe/Paris")
        assert client.contacts.get(str(ann["id"])) == changed  # by id as well as by address
        batch = client.contacts.batch([{"email": "bob@example.org"}, {"email": "nope"}, {"email": "ann@example.org"}])
        assert (batch["created"], batch["updated"], batch["rejected"]) == (1, 1, 1)
        assert batch["results"][1]["errors"][0]["pointer"].startswith("/contacts/1")
        assert [c["email"] for c in client.contacts.list(page_size=1)] == ["ann@example.org", "bob@example.org"]
        client.contacts.delete("bob@example.org")
        with pytest.raises(NotFound):
            client.contacts.get("bob@example.org")
    assert rows(Contact) == 1 and rows(Suppression) == 1  # erased, its address kept suppressed


def test_lists(api):
    with Client(api.url, api.key("contacts:read", "contacts:write")) as client:
        created = client.lists.create("news letter", "Weekly")
        assert (created["name"], created["description"], created["members"]) == ("news letter", "Weekly", 0)
        assert client.lists.add_members("news letter", ["a+x@example.org", "b@example.org"]) == 2
        assert client.lists.add_members("news letter", ["b@example.org"]) == 0
        assert [c["email"] for c in client.lists.members("news letter", page_size=1)] == [
            "a+x@example.org",
            "b@example.org",
        ]
        client.lists.remove_member("news letter", "a+x@example.org")
        assert client.lists.get("news letter")["members"] == 1
        assert [c["email"] for c in client.contacts.list(list="news letter")] == ["b@example.org"]
        assert [item["name"] for item in client.lists.list()] == ["news letter"]
        client.lists.delete("news letter")
        with pytest.raises(NotFound):
            client.lists.get("news letter")
        assert client.contacts.get("a+x@example.org")["lists"] == []  # the contacts stay


def test_segments(api):
    with Client(api.url, api.key("contacts:write", "segments:read", "segments:write")) as client:
        for email, plan in (("a@example.org", "pro"), ("b@example.org", "free"), ("c@example.org", "pro")):
            client.contacts.upsert(email, attributes={"plan": plan})
        rules = {"attr": "plan", "op": "eq", "value": "pro"}
        assert client.segments.save("pro users", rules)["rules"] == rules
        assert client.segments.count("pro users") == 2
        assert [c["email"] for c in client.segments.preview("pro users", limit=1)] == ["a@example.org"]
        assert client.segments.get("pro users")["rules"] == rules
        assert [s["name"] for s in client.segments.list()] == ["pro users"]
        with pytest.raises(ValidationFailed) as raised:
            client.segments.save("pro users", {"attr": "plan", "op": "like", "value": "x"})
        assert raised.value.errors[0]["pointer"] == "/rules/op"
        client.segments.delete("pro users")
        with pytest.raises(NotFound):
            client.segments.count("pro users")


def test_events_with_a_client_id_are_stored_once(api):
    event = {"email": "a@example.org", "type": "order_placed", "properties": {"total": 12}, "id": "order-1"}
    with Client(api.url, api.key("events:write")) as client:
        first = client.events.send([event, {"email": "a@example.org", "type": "1bad"}])
        again = client.events.send([event])  # a new request (its own Idempotency-Key): the id makes it a duplicate
    assert (first["accepted"], first["duplicates"], first["rejected"]) == (1, 0, 1)
    assert first["results"][1]["errors"][0]["pointer"] == "/events/1/type"
    assert (again["accepted"], again["duplicates"], again["results"]) == (
        0,
        1,
        [{"index": 0, "id": "order-1", "duplicate": True}],
    )
    assert rows(Event, Event.client_event_id == "order-1") == rows(Event) == 1


def test_suppressions(api):
    with Client(api.url, api.key("suppressions:read", "suppressions:write")) as client:
        added = client.suppressions.add("B@example.org", detail="asked by phone")
        assert (added["email"], added["reason"], added["detail"]) == ("b@example.org", "manual", "asked by phone")
        client.suppressions.add("a@example.org", reason="hard_bounce")
        client.suppressions.add("c@example.org")
        assert client.suppressions.get("B@Example.org")["email"] == "b@example.org"
        manual = [s["email"] for s in client.suppressions.list(page_size=1, reason="manual")]
        assert manual == ["b@example.org", "c@example.org"]
        assert [s["email"] for s in client.suppressions.list(reason="hard_bounce")] == ["a@example.org"]
        client.suppressions.delete("a@example.org")
        with pytest.raises(NotFound):
            client.suppressions.get("a@example.org")
    assert rows(Suppression) == 2


def test_campaigns(api):
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    with Client(api.url, api.key("contacts:write", "templates:write", "campaigns:read", "campaigns:write")) as client:
        client.templates.create("promo", "Sale", "<p>Sale</p>")
        client.lists.create("news")
        client.lists.add_members("news", ["a@example.org"])
        draft = client.campaigns.create(
            "spring 2026", "promo", lists=["news"], from_="Shop <shop@example.org>", tags=["s"]
        )
        assert (draft["state"], draft["from"], draft["lists"]) == ("draft", "Shop <shop@example.org>", ["news"])
        assert client.campaigns.get("spring 2026") == draft
        changed = client.campaigns.update("spring 2026", window="08:00-20:00", from_="News <news@example.org>")
        assert (changed["window"], changed["from"]) == ("08:00-20:00", "News <news@example.org>")
        scheduled = client.campaigns.schedule("spring 2026", later)
        assert scheduled["state"] == "scheduled"
        assert datetime.fromisoformat(scheduled["send_at"]) == later
        assert client.campaigns.cancel("spring 2026")["state"] == "cancelled"
        with pytest.raises(Conflict):
            client.campaigns.update("spring 2026", rate_cap=5)
        progress = client.campaigns.progress("spring 2026")
        assert (progress["name"], progress["state"], progress["total"]) == ("spring 2026", "cancelled", 0)
        client.campaigns.create("summer", "promo", lists=["news"])
        assert [c["name"] for c in client.campaigns.list(page_size=1)] == ["summer", "spring 2026"]
        assert [c["name"] for c in client.campaigns.list(state="cancelled")] == ["spring 2026"]


def test_keys(api):
    with Client(api.url, api.key("keys:manage", "events:write")) as admin:
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        created = admin.keys.create("app", ["events:write"], expires_at=expires, rate_limit=5, burst=10)
        assert (created["scopes"], created["rate_limit"], created["burst"]) == (["events:write"], 5, 10)
        assert datetime.fromisoformat(created["expires_at"]) == expires
        with pytest.raises(Forbidden, match="messages:send"):
            admin.keys.create("more", ["messages:send"])  # it cannot grant what it lacks
        with Client(api.url, created["key"]) as app:
            assert app.events.send([{"email": "a@example.org", "type": "signup"}])["accepted"] == 1
            assert admin.keys.get(created["id"])["last_used_at"] is not None
            assert created["id"] in [k["id"] for k in admin.keys.list(page_size=1)]
            revoked = admin.keys.revoke(created["id"])
            assert revoked["revoked"] and revoked["id"] == created["id"]
            assert created["id"] not in [k["id"] for k in admin.keys.list(active=True)]
            with pytest.raises(Unauthorized):
                app.events.send([{"email": "a@example.org", "type": "signup"}])
    assert rows(Event) == 1


PEOPLE_CSV = b"E-Mail,age\r\nann@example.org,41\r\nnot-an-address,30\r\n"


def test_an_import_is_queued(api, tmp_path):
    path = tmp_path / "people.csv"
    path.write_bytes(PEOPLE_CSV)
    with Client(api.url, api.key("contacts:read", "contacts:write")) as client:
        client.lists.create("customers")
        job = client.imports.create(path, list="customers", map={"E-Mail": "email"}, type={"age": "integer"})
        assert (job["state"], job["filename"], job["total_bytes"]) == ("pending", "people.csv", len(PEOPLE_CSV))
        assert (job["options"]["list"], job["options"]["mapping"]) == ("customers", {"E-Mail": "email"})
        assert job["options"]["types"] == {"age": "integer"}
        assert client.imports.get(job["id"]) == job
        assert [j["id"] for j in client.imports.list(state="pending")] == [job["id"]]
        with pytest.raises(ValidationFailed) as raised:
            client.imports.create(path, map={"E-Mail": "nowhere=x"})
        assert raised.value.errors[0]["pointer"].startswith("/map")
    assert rows(ImportJob) == 1


def test_an_import_is_run_by_a_worker(api, shared_worker, tmp_path):
    worker = shared_worker(concurrency=1, queues="imports")
    path = tmp_path / "people.csv"
    path.write_bytes(PEOPLE_CSV)
    with Client(api.url, api.key("contacts:read", "contacts:write")) as client:
        with path.open("rb") as file:
            job = client.imports.create(file, map={"E-Mail": "email"}, type={"age": "integer"})

        def finished():
            found = client.imports.get(job["id"])
            return found if found["state"] in ("done", "failed") else None

        done = wait_for(finished, 60, interval=0.1, message=lambda: worker.output()[-3000:])
        assert (done["state"], done["created"], done["failed"]) == ("done", 1, 1)
        assert client.contacts.get("ann@example.org")["attributes"] == {"age": 41}
        report = client.imports.errors(job["id"])
        assert report.splitlines()[0].startswith("row") and "not-an-address" in report


def test_the_callers_idempotency_key_replays_the_first_answer(api):
    with Client(api.url, api.key("messages:send")) as client:
        first = client.messages.send("a@example.org", subject="s", text="t", idempotency_key="order-7")
        assert client.messages.send("a@example.org", subject="s", text="t", idempotency_key="order-7") == first
        with pytest.raises(ValidationFailed, match="Idempotency-Key"):
            client.messages.send("b@example.org", subject="s", text="t", idempotency_key="order-7")
    assert stored_ids() == [first["id"]]


def test_names_are_path_segments_and_addresses_with_a_slash_are_reachable(api):
    with Client(api.url, api.key("contacts:read", "contacts:write", "suppressions:write")) as client:
        with pytest.raises(ValidationFailed) as refused:
            client.lists.create("news/members")
        assert refused.value.errors[0]["pointer"] == "/name"
        client.lists.create("news")
        client.contacts.upsert("a/b@example.org")
        client.lists.add_members("news", ["a/b@example.org"])
        assert client.contacts.get("a/b@example.org")["lists"] == ["news"]
        client.lists.remove_member("news", "a/b@example.org")
        assert client.contacts.update("a/b@example.org", attributes={"x": 1})["attributes"] == {"x": 1}
        client.suppressions.add("a/b@example.org")
        client.suppressions.delete("a/b@example.org")
        client.contacts.delete("a/b@example.org")
        with pytest.raises(NotFound):
            client.contacts.get("a/b@example.org")
