"""smartmail.client against a real `smartmail web` process: sends, typed errors, paging, and retries that send once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from smartmail.client import Client, Forbidden, Unauthorized, ValidationFailed
from smartmail.store.engine import session_scope
from smartmail.store.models import Message


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
