"""Real webhook receivers for tests: HTTPS with a scripted answer per request, and a plain HTTP one on loopback."""

from __future__ import annotations

import itertools
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import trustme

HANG = -1  # a script's answer that never answers: the request waits until the receiver stops


@dataclass(frozen=True)
class ReceivedRequest:
    number: int  # 1 for the receiver's first request
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes  # raw, as received: what signatures are checked against
    at: float  # time.time() when the request (its body included) had arrived
    connection: int  # the TCP connection it came on, 1 for the first

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return orjson.loads(self.body)


Script = Callable[[int, ReceivedRequest], int]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: many requests per connection
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.server.receiver._new_connection()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        receiver = self.server.receiver
        status = receiver._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body, self)
        if status == HANG:
            receiver._stopping.wait()
            self.close_connection = True
            return
        answer = b'{"ok":true}' if 200 <= status < 300 else b'{"error":"scripted"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops the SYNs of ten connections opened at once
    receiver: WebhookReceiver

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake in the connection's own thread: a slow client never holds up accept().
        try:
            tls = self.receiver._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class WebhookReceiver:
    """An HTTPS server on 127.0.0.1 (HTTP/1.1, keep-alive, a thread per connection) whose certificate,
    for `hooks.test` and 127.0.0.1, is signed by `authority`; workers trust it through
    SMARTMAIL_WEBHOOK_CA_FILE (`certificate_authority_file`). Every request is kept in `requests`;
    `respond(script)` decides the answers: `script(number, request)` returns a status, or HANG.

        with WebhookReceiver(trustme.CA()) as receiver:
            receiver.respond(lambda number, request: 503 if number <= 3 else 200)
            receiver.url("/hooks")   # https://127.0.0.1:<port>/hooks
    """

    def __init__(self, authority: trustme.CA, *, delay: float = 0.0) -> None:
        self.authority = authority
        self.delay = delay  # seconds each answer waits: a slow receiver
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("hooks.test", "127.0.0.1").configure_cert(self._tls)
        self._tls.set_alpn_protocols(["http/1.1"])
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._connections = itertools.count(1)
        self._script: Script = lambda _number, _request: 200
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="webhook-receiver", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/hooks", host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def respond(self, script: Script) -> None:
        self._script = script

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def webhook_ids(self) -> Counter[str]:
        """How many times each webhook-id arrived."""
        return Counter(request.webhook_id for request in self.requests)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # hanging requests end (unanswered)
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _new_connection(self) -> int:
        with self._lock:
            return next(self._connections)

    def _record(self, path: str, headers: dict[str, str], body: bytes, handler: _Handler) -> int:
        with self._lock:
            request = ReceivedRequest(
                len(self._requests) + 1, path, headers, body, time.time(), handler.connection_number
            )
            self._requests.append(request)
            script = self._script
        status = script(request.number, request)
        if self.delay and status != HANG:
            time.sleep(self.delay)
        return status


def write_authority(authority: trustme.CA, directory: Path) -> Path:
    """The authority's certificate as a PEM file, for SMARTMAIL_WEBHOOK_CA_FILE."""
    path = directory / "webhook-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return path


def events_of(requests: Iterator[ReceivedRequest] | list[ReceivedRequest]) -> list[dict[str, Any]]:
    """The events the requests carried: `data` of each, and of each item of a batch (an item is the
    body a single delivery would have had)."""
    found: list[dict[str, Any]] = []
    for request in requests:
        body = request.json()
        found.extend(item["data"] for item in (body["data"] if body["type"] == "batch" else [body]))
    return found


class PlainReceiver:
    """An HTTP/1.1 keep-alive server on 127.0.0.1 recording (headers, body, time.monotonic()) per
    request; `status` is the answer's status, or a function of the request's number (from 1); a 2xx
    answer carries `answer`, any other "receiver is down"."""

    def __init__(self, answer: bytes = b'{"ok": true}') -> None:
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.status: int | Callable[[int], int] = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                status = receiver.status(len(receiver.requests)) if callable(receiver.status) else receiver.status
                reply = answer if status < 300 else b"receiver is down"
                self.send_response(status)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 128, "daemon_threads": True})
        self.server = server_class(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
