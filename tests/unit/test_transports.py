"""Unit tests for smartmail.workers.transports, against a real in-process aiosmtpd server."""

from __future__ import annotations

import asyncio
import io
import os
import smtplib
import socket
import ssl
import threading
import time
import types
from dataclasses import dataclass

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from smartmail.config.settings import Settings, SmtpUrl
from smartmail.workers import smtp_transport, transports
from smartmail.workers.outcomes import Reply, Verdict, classify
from smartmail.workers.transports import (
    ConsoleTransport,
    FileTransport,
    MemoryTransport,
    Outgoing,
    SmtpTransport,
    build_transport,
)

SENDER = "bounces@example.com"


def message(n: int | str = 1, recipient: str = "rcpt@example.net") -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: message {n}\r\n\r\n"
        f"Body of message {n}.\r\n.line starting with a dot\r\n"
    ).encode()


# --- the in-process SMTP server -----------------------------------------------------------------


@dataclass
class Received:
    conn: int
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool


class RecordingHandler:
    """Records connections, transactions, RSETs and QUITs; answers scripted replies.

    `mail_replies` / `rcpt_replies` / `data_replies` map an address (the sender, or the first
    recipient for DATA) to the reply to give instead of accepting. Addresses in `hang_up_after`
    make the server close the connection right after sending that reply.
    """

    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining  # offer PIPELINING (aiosmtpd reads pipelined commands in order)
        self.connections = 0
        self.ehlo_names: list[str] = []
        self.received: list[Received] = []
        self.rejected_data: list[Received] = []
        self.rsets: list[int] = []
        self.quits: list[int] = []
        self.mail_replies: dict[str, str] = {}
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: dict[str, str] = {}
        self.hang_up_after: set[str] = set()
        self.pretend_rcpt: set[str] = set()  # answer 250 to RCPT without taking the recipient
        self.stall_rcpt: set[str] = set()  # answer RCPT only after 3 s
        self.gather_data = 1  # hold DATA until this many transactions are in DATA at once
        self.data_delay = 0.0  # seconds before answering the end of data
        self._in_data = 0
        self.protocols: list = []

    @staticmethod
    def _conn(server) -> int:
        return getattr(server, "test_conn", 0)

    async def _answer(self, server, key: str, reply: str) -> str:
        if key in self.hang_up_after:
            await server.push(reply)
            server.transport.close()
        return reply

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if not hasattr(server, "test_conn"):  # the second EHLO after STARTTLS is the same connection
            self.connections += 1
            server.test_conn = self.connections
            self.protocols.append(server)
            self.ehlo_names.append(hostname)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address in self.mail_replies:
            return await self._answer(server, address, self.mail_replies[address])
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return await self._answer(server, address, self.rcpt_replies[address])
        if address in self.pretend_rcpt:
            return "250 OK"
        if address in self.stall_rcpt:
            await asyncio.sleep(3)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self._in_data += 1
        deadline = time.monotonic() + 5
        while self._in_data < self.gather_data and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.data_delay)
        record = Received(
            self._conn(server), envelope.mail_from, list(envelope.rcpt_tos), envelope.content, session.ssl is not None
        )
        first = envelope.rcpt_tos[0]
        if first in self.data_replies:
            self.rejected_data.append(record)
            return await self._answer(server, first, self.data_replies[first])
        self.received.append(record)
        return "250 2.0.0 Ok: queued"

    async def handle_RSET(self, server, session, envelope):
        self.rsets.append(self._conn(server))
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server, session, envelope):
        self.quits.append(self._conn(server))
        return "221 2.0.0 Bye"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An aiosmtpd Controller that can be stopped and started again on the same port."""

    def __init__(self, handler: RecordingHandler, port: int | None = None, **kwargs) -> None:
        self.handler = handler
        self.port = port or free_port()
        self.kwargs = kwargs
        self.controller: Controller | None = None

    def start(self) -> Server:
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, server_hostname="smtp.test", **self.kwargs
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def drop_connections(self) -> None:
        """Close every client connection from the server side, as a relay does with idle sessions."""

        async def close_all():
            for protocol in self.handler.protocols:
                if protocol.transport is not None:
                    protocol.transport.close()
            await asyncio.sleep(0.05)  # let the loop run connection_lost and close the sockets

        assert self.controller is not None
        asyncio.run_coroutine_threadsafe(close_all(), self.controller.loop).result(5)

    def url(self, tls: str = "none", username: str | None = None, password: str | None = None) -> SmtpUrl:
        return SmtpUrl("127.0.0.1", self.port, tls, username, password)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, params=["blocking", "window"])
def driver(request, monkeypatch) -> str:
    """Every SmtpTransport test runs its sends both ways: send() (smtplib's blocking reads) and a
    window of one through send_window (smtp_window's event loop, which reads the socket itself)."""
    if request.param == "window":
        monkeypatch.setattr(SmtpTransport, "send", lambda self, *message: self.send_window([Outgoing(*message)], 4)[0])
    return request.param


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def handler(request) -> RecordingHandler:
    """Every transport test runs against a relay without and with PIPELINING (RFC 2920)."""
    return RecordingHandler(pipelining=request.param)


@pytest.fixture
def server(handler):
    srv = Server(handler).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_transport():
    made: list[SmtpTransport] = []

    def make(url: SmtpUrl, **kwargs) -> SmtpTransport:
        kwargs.setdefault("timeout", 5)
        transport = SmtpTransport(url, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


@pytest.fixture
def transport(server, make_transport) -> SmtpTransport:
    return make_transport(server.url())


# --- SmtpTransport: the happy path and connection reuse -----------------------------------------


def test_delivers_the_message_as_given(transport, handler):
    reply = transport.send(SENDER, "alice@example.net", message(1, "alice@example.net"))
    assert reply.code == 250
    assert "queued" in reply.text
    assert classify(reply).verdict is Verdict.SENT
    [got] = handler.received
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["alice@example.net"]
    assert got.content == message(1, "alice@example.net")  # dot-stuffing undone, CRLF kept


def test_mail_rcpt_and_data_go_in_one_write_when_the_relay_offers_pipelining(transport, handler, monkeypatch):
    writes = record_writes(monkeypatch)
    transport.send(SENDER, "warm-up@example.net", message())  # the session: EHLO
    writes.clear()

    assert transport.send(SENDER, "rcpt@example.net", message()).code == 250
    assert transport.send(SENDER, "rcpt2@example.net", message()).code == 250

    if handler.pipelining:
        assert len(writes) == 4  # per message: the three commands, then the body
        assert writes[0] == commands("rcpt@example.net")
    else:
        assert len(writes) == 8
    assert [r.rcpt_tos for r in handler.received[1:]] == [["rcpt@example.net"], ["rcpt2@example.net"]]


def test_a_line_break_in_an_envelope_address_is_refused_before_anything_is_sent(transport, handler):
    got = transport.send(SENDER, "rcpt@example.net\r\nRCPT TO:<other@example.net>", message())
    assert (got.code, handler.connections, handler.received) == (553, 0, [])


def test_reuses_one_connection_for_many_messages(transport, handler):
    replies = [transport.send(SENDER, f"user{i}@example.net", message(i)) for i in range(20)]
    assert [r.code for r in replies] == [250] * 20
    assert handler.connections == 1
    assert transport.connections_opened == 1
    assert {r.conn for r in handler.received} == {1}
    assert [r.rcpt_tos[0] for r in handler.received] == [f"user{i}@example.net" for i in range(20)]
    assert handler.rsets == []  # no RSET between successful transactions


def test_close_quits_the_pooled_connection(transport, handler):
    transport.send(SENDER, "a@example.net", message())
    transport.close()
    deadline = time.monotonic() + 2
    while not handler.quits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.quits == [1]
    # After close() the transport still works: it opens a new connection.
    assert transport.send(SENDER, "b@example.net", message()).code == 250
    assert handler.connections == 2


def test_local_hostname_is_sent_in_ehlo(server, handler, make_transport):
    transport = make_transport(server.url(), local_hostname="mailer.example.com")
    transport.send(SENDER, "a@example.net", message())
    assert handler.ehlo_names == ["mailer.example.com"]


def test_max_messages_per_connection_opens_a_new_connection_after_n(server, handler, make_transport):
    transport = make_transport(server.url(), max_messages_per_connection=3)
    replies = [transport.send(SENDER, f"u{i}@example.net", message(i)) for i in range(7)]
    assert [r.code for r in replies] == [250] * 7
    assert handler.connections == 3
    assert transport.connections_opened == 3
    assert [r.conn for r in handler.received] == [1, 1, 1, 2, 2, 2, 3]
    # Retired connections are closed politely.
    assert handler.quits == [1, 2]


def test_failed_transactions_count_towards_the_cap(server, handler, make_transport):
    handler.rcpt_replies["gone@example.net"] = "550 5.1.1 <gone@example.net>: Recipient address rejected"
    transport = make_transport(server.url(), max_messages_per_connection=2)
    assert transport.send(SENDER, "gone@example.net", message()).code == 550
    assert transport.send(SENDER, "ok@example.net", message()).code == 250
    assert transport.send(SENDER, "ok2@example.net", message()).code == 250
    assert [r.conn for r in handler.received] == [1, 2]


def test_concurrent_senders_share_the_pool(server, handler, make_transport):
    transport = make_transport(server.url(), max_idle=4)
    errors: list[Reply] = []

    def worker(t: int) -> None:
        for i in range(10):
            reply = transport.send(SENDER, f"t{t}-{i}@example.net", message(f"{t}-{i}"))
            if reply.code != 250:
                errors.append(reply)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(handler.received) == 40
    assert len({r.rcpt_tos[0] for r in handler.received}) == 40
    assert 1 <= transport.connections_opened <= 4
    assert handler.connections == transport.connections_opened


# --- SmtpTransport.send_window: one thread, many transactions ----------------------------------


def test_a_window_runs_its_transactions_side_by_side(server, handler, make_transport):
    handler.gather_data = 4  # the relay answers DATA only once 4 transactions are in DATA together
    transport = make_transport(server.url(), max_idle=4)
    started = time.monotonic()
    replies = transport.send_window([Outgoing(SENDER, f"w{i}@example.net", message(i)) for i in range(8)], 4)
    assert [r.code for r in replies] == [250] * 8
    assert time.monotonic() - started < 4  # one at a time, each DATA would wait out the relay's 5 s
    assert sorted(r.rcpt_tos[0] for r in handler.received) == sorted(f"w{i}@example.net" for i in range(8))
    assert handler.connections == 4


def test_a_window_reports_each_message_in_order_and_keeps_its_sessions(server, handler, make_transport):
    handler.rcpt_replies["unknown@example.net"] = "550 5.1.1 User unknown"
    handler.data_replies["grey@example.net"] = "451 4.7.1 Greylisted"
    handler.rcpt_replies["rude@example.net"] = "554 5.7.1 Go away"
    handler.hang_up_after.add("rude@example.net")
    recipients = [
        "a@example.net",
        "unknown@example.net",
        "b@example.net",
        "grey@example.net",
        "rude@example.net",
        "c@example.net",
        "d@example.net",
        "unknown@example.net",
        "e@example.net",
    ]
    transport = make_transport(server.url(), max_idle=3)
    replies = transport.send_window([Outgoing(SENDER, r, message(r, r)) for r in recipients], 3)
    assert [(r.code, r.stage) for r in replies] == [
        (250, "data"),
        (550, "rcpt"),
        (250, "data"),
        (451, "data"),
        (554, "rcpt"),
        (250, "data"),
        (250, "data"),
        (550, "rcpt"),
        (250, "data"),
    ]
    assert sorted(r.rcpt_tos[0] for r in handler.received) == [f"{x}@example.net" for x in "abcde"]
    assert all(r.content == message(r.rcpt_tos[0], r.rcpt_tos[0]) for r in handler.received)
    # After each rejection before the end of data (which clears the transaction by itself), except
    # on the session the relay hung up.
    assert len(handler.rsets) == 2
    assert handler.connections <= 4  # three sessions, and one to replace the one hung up


def test_a_window_shares_a_sites_only_connection(server, handler, make_transport):
    gate = FakeGate(limit=1)
    transport = make_transport(server.url(), gate=gate)
    one = site("one")
    replies = transport.send_window([Outgoing(SENDER, f"o{i}@one.example", message(i), one) for i in range(6)], 4)
    assert [r.code for r in replies] == [250] * 6, replies
    assert handler.connections == 1 and len(handler.received) == 6


def test_a_silent_relay_times_out_one_transaction_not_the_window(server, handler, make_transport):
    handler.stall_rcpt.add("slow@example.net")
    transport = make_transport(server.url(), timeout=0.5, max_idle=2)
    started = time.monotonic()
    replies = transport.send_window(
        [
            Outgoing(SENDER, r, message(r, r))
            for r in ("a@example.net", "slow@example.net", "b@example.net", "c@example.net")
        ],
        2,
    )
    assert time.monotonic() - started < 2.5
    assert replies[1].code is None and replies[1].stage == "rcpt" and "timed out" in replies[1].text
    assert [replies[i].code for i in (0, 2, 3)] == [250, 250, 250]


def test_a_window_gives_each_message_its_ready_check(server, handler, make_transport):
    transport = make_transport(server.url())
    asked: list[str] = []

    def ready(recipient: str):
        return lambda: asked.append(recipient) or recipient != "held@example.net"

    replies = transport.send_window(
        [
            Outgoing(SENDER, r, message(r, r), None, ready(r))
            for r in ("a@example.net", "held@example.net", "b@example.net")
        ],
        2,
    )
    assert [r.stage for r in replies] == ["data", transports.HELD, "data"]
    assert sorted(asked) == ["a@example.net", "b@example.net", "held@example.net"]
    assert sorted(r.rcpt_tos[0] for r in handler.received) == ["a@example.net", "b@example.net"]


# --- Windows: each body goes out with the next message's commands (RFC 2920 section 3.1) --------


def record_writes(monkeypatch) -> list[bytes]:
    writes: list[bytes] = []
    real_send = smtplib.SMTP.send
    monkeypatch.setattr(smtplib.SMTP, "send", lambda self, data: writes.append(data) or real_send(self, data))
    return writes


def commands(recipient: str) -> bytes:
    return f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()


def test_a_window_sends_each_body_with_the_next_messages_commands(server, handler, make_transport, monkeypatch):
    transport = make_transport(server.url(), max_idle=1)
    writes = record_writes(monkeypatch)
    recipients = [f"n{i}@example.net" for i in range(5)]
    replies = transport.send_window([Outgoing(SENDER, r, message(r, r)) for r in recipients], 1)
    assert [r.code for r in replies] == [250] * 5
    assert [r.rcpt_tos[0] for r in handler.received] == recipients
    assert all(r.content == message(r.rcpt_tos[0], r.rcpt_tos[0]) for r in handler.received)
    assert handler.connections == 1 and handler.rsets == []
    writes = [w for w in writes if isinstance(w, bytes)]  # not smtplib's own EHLO
    if handler.pipelining:
        body = [transports._dot_stuffed(message(r, r)) for r in recipients]
        assert writes == [commands(recipients[0])] + [body[i] + commands(recipients[i + 1]) for i in range(4)] + [
            body[4]
        ]
    else:
        assert len(writes) == 20  # MAIL, RCPT, DATA and the body, one write each


def test_a_rejected_body_does_not_hold_up_the_next_message_on_its_connection(server, handler, make_transport):
    handler.data_replies["grey@example.net"] = "451 4.7.1 Greylisted"
    handler.data_replies["spam@example.net"] = "554 5.7.1 Rejected, closing connection"
    handler.hang_up_after.add("spam@example.net")
    recipients = ["a@example.net", "grey@example.net", "b@example.net", "spam@example.net", "c@example.net"]
    transport = make_transport(server.url(), max_idle=1)
    replies = transport.send_window([Outgoing(SENDER, r, message(r, r)) for r in recipients], 1)
    assert [(r.code, r.stage) for r in replies] == [
        (250, "data"),
        (451, "data"),
        (250, "data"),
        (554, "data"),
        (250, "data"),
    ]
    assert [r.rcpt_tos[0] for r in handler.received] == ["a@example.net", "b@example.net", "c@example.net"]
    # The end of data cleared each rejected transaction; c went on a new session once the relay hung up.
    assert handler.rsets == [] and handler.connections == 2
    assert [r.conn for r in handler.received] == [1, 1, 2]


class HangingRelay:
    """A bare SMTP relay in a thread: in its first session it reads the `hang_up_at`-th body, then
    closes the connection without answering it; later sessions answer everything."""

    def __init__(self, hang_up_at: int, pipelining: bool) -> None:
        self.hang_up_at, self.pipelining = hang_up_at, pipelining
        self.bodies: list[tuple[int, bytes]] = []  # (session, body)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.url = SmtpUrl("127.0.0.1", self.listener.getsockname()[1], "none")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        session = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            session += 1
            with conn, conn.makefile("rb") as f:
                conn.sendall(b"220 test ESMTP\r\n")
                while line := f.readline():
                    command = line.strip().upper()
                    if command.startswith(b"EHLO"):
                        conn.sendall(b"250-test\r\n250 PIPELINING\r\n" if self.pipelining else b"250 test\r\n")
                    elif command.startswith((b"MAIL", b"RCPT")):
                        conn.sendall(b"250 ok\r\n")
                    elif command == b"DATA":
                        conn.sendall(b"354 go ahead\r\n")
                        self.bodies.append((session, b"".join(iter(f.readline, b".\r\n"))))
                        if session == 1 and len(self.bodies) == self.hang_up_at:
                            time.sleep(0.1)  # pipelined commands that follow the body arrive meanwhile
                            break
                        conn.sendall(b"250 queued\r\n")
                    elif command == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux); close() alone does not
        self.listener.close()
        self.thread.join(5)


def test_a_connection_lost_after_a_body_leaves_it_unknown_and_retries_the_next_message(make_transport):
    """The relay reads the second body and the third message's commands, then hangs up unanswered:
    the second is unknown (it may have been taken), the third goes on a new connection."""
    relay = HangingRelay(hang_up_at=2, pipelining=True)
    transport = make_transport(relay.url, max_idle=1)
    try:
        recipients = ["a@example.net", "b@example.net", "c@example.net"]
        replies = transport.send_window([Outgoing(SENDER, r, message(r, r)) for r in recipients], 1)
        assert replies[0].code == 250 and replies[2].code == 250
        assert replies[1].code is None and replies[1].stage == "data"
        assert classify(replies[1]).verdict is Verdict.UNKNOWN
        assert [(session, b"To: " + r.encode() in body) for (session, body), r in zip(relay.bodies, recipients)] == [
            (1, True),
            (1, True),
            (2, True),
        ]
    finally:
        transport.close()  # its pooled session ends, so the relay's thread does
        relay.close()


def test_a_borrower_held_back_leaves_the_window_within_its_parallelism(server, handler, make_transport):
    handler.data_delay = 0.3  # the first message's final reply comes while the second is held back
    transport = make_transport(server.url())
    messages = [
        Outgoing(SENDER, "a@example.net", message("a")),
        Outgoing(SENDER, "held@example.net", message("held"), None, lambda: False),
        Outgoing(SENDER, "c@example.net", message("c")),
    ]
    replies = transport.send_window(messages, 1)
    assert [r.stage for r in replies] == ["data", transports.HELD, "data"]
    assert handler.connections == 1


def test_a_body_that_cannot_be_sent_ends_its_window(server, handler, make_transport, monkeypatch):
    real_send = smtplib.SMTP.send

    def send(self, data):
        if isinstance(data, bytes) and data.startswith(b"From:"):  # the relay reset the connection
            self.close()
            raise smtplib.SMTPServerDisconnected("Server not connected")
        return real_send(self, data)

    monkeypatch.setattr(smtplib.SMTP, "send", send)
    transport = make_transport(server.url(), timeout=5)
    started = time.monotonic()
    replies = transport.send_window([Outgoing(SENDER, "a@example.net", message())], 1)
    assert (replies[0].code, replies[0].stage) == (None, "data")
    assert time.monotonic() - started < 2


def test_a_socket_number_reused_after_a_retired_connection_closed_is_taken_over(server, handler, make_transport):
    """The first message retires its connection (closed, number freed); the second needs a new one
    and the window's wake-up socket takes the freed number."""
    transport = make_transport(server.url(), max_messages_per_connection=2)
    assert transport.send(SENDER, "warm@example.net", message()).code == 250
    replies = transport.send_window([Outgoing(SENDER, f"r{i}@example.net", message(i)) for i in range(2)], 1)
    assert [r.code for r in replies] == [250, 250]
    assert handler.connections == 2


def test_a_window_lends_a_connection_only_within_its_site_and_cap(server, handler, make_transport):
    gate = FakeGate(limit=1)
    transport = make_transport(server.url(), gate=gate)
    one, two = site("one", max_messages=3), site("two")
    messages = [Outgoing(SENDER, f"m{i}@{s.name}.example", message(i), s) for i, s in enumerate([one, two] * 4)]
    replies = transport.send_window(messages, 2)
    assert [r.code for r in replies] == [250] * 8
    by_site = {
        name: [r.conn for r in handler.received if r.rcpt_tos[0].endswith(f"@{name}.example")]
        for name in ("one", "two")
    }
    assert len(set(by_site["two"])) == 1 and len(by_site["two"]) == 4
    assert len(set(by_site["one"])) == 2  # one's connection retired after 3 messages
    assert sorted(by_site["one"]).count(by_site["one"][0]) == 3


# --- SmtpTransport: failed transactions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "reply", "verdict", "suppress"),
    [
        ("rcpt", "451 4.3.0 Temporary lookup failure", Verdict.DEFERRED, False),
        ("rcpt", "550 5.1.1 <bad@example.net>: Recipient address rejected: User unknown", Verdict.FAILED, True),
        ("rcpt", "452 4.5.3 Too many recipients", Verdict.DEFERRED, False),
        ("data", "554 5.7.1 Message rejected as spam", Verdict.FAILED, False),
        ("data", "451 4.7.1 Greylisted, try again later", Verdict.DEFERRED, False),
        # A rejected sender is our set-up, not the recipient: deferred until it is fixed.
        ("mail", "553 5.1.8 Sender address rejected: Domain not found", Verdict.DEFERRED, False),
        ("mail", "550 5.1.0 Sender address rejected", Verdict.DEFERRED, False),
    ],
)
def test_rejection_is_reported_then_rset_and_the_connection_reused(transport, handler, stage, reply, verdict, suppress):
    bad = "bad@example.net"
    if stage == "rcpt":
        handler.rcpt_replies[bad] = reply
    elif stage == "data":
        handler.data_replies[bad] = reply
    sender = "nobody@invalid.example" if stage == "mail" else SENDER
    if stage == "mail":
        handler.mail_replies[sender] = reply

    got = transport.send(sender, bad, message("bad", bad))
    code, _, text = reply.partition(" ")
    assert got == Reply(int(code), text)
    outcome = classify(got)
    assert (outcome.verdict, outcome.suppress) == (verdict, suppress)
    # RFC 5321 section 4.1.1.5: the failed transaction is cleared with RSET on the same session,
    # unless the end of data cleared it already (section 4.1.1.4)...
    assert handler.rsets == ([] if stage == "data" else [1])
    # ...which then carries the next message.
    assert transport.send(SENDER, "good@example.net", message("good")).code == 250
    assert handler.connections == 1
    assert [r.rcpt_tos for r in handler.received] == [["good@example.net"]]
    assert handler.received[0].mail_from == SENDER  # the rejected envelope did not leak into the next one


def test_data_command_refused_before_354_is_reported_and_the_session_kept(transport, handler):
    # aiosmtpd answers "503 need RCPT" to DATA when no recipient was really taken.
    handler.pretend_rcpt.add("ghost@example.net")
    got = transport.send(SENDER, "ghost@example.net", message())
    assert got.code == 503
    assert handler.rsets == [1]
    assert transport.send(SENDER, "good@example.net", message()).code == 250
    assert handler.connections == 1


def test_several_failures_in_a_row_keep_one_connection(transport, handler):
    for i in range(5):
        handler.rcpt_replies[f"bad{i}@example.net"] = "550 5.1.1 unknown"
    results = [transport.send(SENDER, f"bad{i}@example.net", message()) for i in range(5)]
    assert [r.code for r in results] == [550] * 5
    assert handler.rsets == [1] * 5
    assert handler.connections == 1


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("rcpt", "550 5.1.1 <bad@example.net>: Recipient address rejected: User unknown"),
        ("data", "554 5.7.1 Message rejected, closing connection"),
        ("data", "421 4.7.0 Too many errors, closing connection"),
    ],
)
def test_reply_is_kept_when_the_relay_hangs_up_after_rejecting(transport, handler, stage, reply):
    bad = "bad@example.net"
    (handler.rcpt_replies if stage == "rcpt" else handler.data_replies)[bad] = reply
    handler.hang_up_after.add(bad)
    got = transport.send(SENDER, bad, message("bad", bad))
    code, _, text = reply.partition(" ")
    assert got == Reply(int(code), text)


def test_the_transport_recovers_after_the_relay_hung_up_on_a_rejection(transport, handler):
    handler.rcpt_replies["bad@example.net"] = "550 5.1.1 unknown"
    handler.hang_up_after.add("bad@example.net")
    transport.send(SENDER, "bad@example.net", message())
    assert transport.send(SENDER, "good@example.net", message()).code == 250
    assert [r.rcpt_tos for r in handler.received] == [["good@example.net"]]
    assert handler.connections == 2


# --- SmtpTransport: dead and missing connections ------------------------------------------------


def test_idle_connection_closed_by_the_server_is_replaced_transparently(server, transport, handler):
    assert transport.send(SENDER, "a@example.net", message(1)).code == 250
    server.drop_connections()
    reply = transport.send(SENDER, "b@example.net", message(2))
    assert reply.code == 250
    assert handler.connections == 2
    assert [(r.conn, r.rcpt_tos) for r in handler.received] == [(1, ["a@example.net"]), (2, ["b@example.net"])]
    assert transport.send(SENDER, "c@example.net", message(3)).code == 250
    assert handler.connections == 2  # and the new connection is pooled in turn


def test_idle_timeout_421_from_the_server_is_handled(handler, make_transport):
    srv = Server(handler, timeout=0.3).start()  # aiosmtpd says "421 ... timeout exceeded" and closes
    try:
        transport = make_transport(srv.url())
        assert transport.send(SENDER, "a@example.net", message(1)).code == 250
        time.sleep(0.8)
        assert transport.send(SENDER, "b@example.net", message(2)).code == 250
        assert handler.connections == 2
        assert len(handler.received) == 2
    finally:
        srv.stop()


def test_server_restart_between_sends_is_survived(handler, make_transport):
    srv = Server(handler).start()
    try:
        transport = make_transport(srv.url(), timeout=3)
        assert transport.send(SENDER, "a@example.net", message(1)).code == 250
        srv.stop()
        srv.start()
        started = time.monotonic()
        assert transport.send(SENDER, "b@example.net", message(2)).code == 250
        assert time.monotonic() - started < 2  # noticed at once, not after the socket timeout
        assert [r.rcpt_tos for r in handler.received] == [["a@example.net"], ["b@example.net"]]
        assert handler.connections == 2
    finally:
        srv.stop()


def test_all_pooled_connections_dead_is_survived(server, handler, make_transport):
    transport = make_transport(server.url(), max_idle=4)
    handler.gather_data = 2  # two transactions in DATA at once: two connections end up in the pool
    threads = [
        threading.Thread(target=transport.send, args=(SENDER, f"p{i}@example.net", message(i))) for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    handler.gather_data = 1
    assert transport.connections_opened == 2 and len(handler.received) == 2
    server.drop_connections()
    assert transport.send(SENDER, "after@example.net", message("after")).code == 250


def test_connection_refused_is_a_reply_without_code(make_transport):
    port = free_port()  # nothing listens there
    transport = make_transport(SmtpUrl("127.0.0.1", port, "none"))
    reply = transport.send(SENDER, "a@example.net", message())
    assert reply.code is None
    assert reply.text.startswith(f"connection to 127.0.0.1:{port} failed:")
    assert classify(reply).verdict is Verdict.DEFERRED
    assert transport.connections_opened == 0


@pytest.fixture
def greeting_server():
    """A raw TCP server that answers every connection with a given greeting and hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    state = {"greeting": b"421 4.7.0 smtp.test Service not available, too busy\r\n", "stop": False}

    def serve():
        listener.settimeout(0.1)
        while not state["stop"]:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(state["greeting"])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], state
    state["stop"] = True
    thread.join(2)
    listener.close()


@pytest.mark.parametrize(
    ("greeting", "expected", "verdict"),
    [
        (
            b"421 4.7.0 smtp.test Service not available, too busy\r\n",
            Reply(None, "session setup refused: 421 4.7.0 smtp.test Service not available, too busy"),
            Verdict.DEFERRED,
        ),
        # A relay refusing the session says nothing about this message: deferred, not failed.
        (
            b"554 5.7.1 smtp.test Your IP is blocked\r\n",
            Reply(None, "session setup refused: 554 5.7.1 smtp.test Your IP is blocked"),
            Verdict.DEFERRED,
        ),
    ],
)
def test_refusing_greeting_is_reported_and_deferred(greeting_server, make_transport, greeting, expected, verdict):
    port, state = greeting_server
    state["greeting"] = greeting
    transport = make_transport(SmtpUrl("127.0.0.1", port, "none"))
    reply = transport.send(SENDER, "a@example.net", message())
    assert reply == expected
    assert classify(reply).verdict is verdict


def test_server_that_never_answers_times_out(make_transport):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts into the backlog but never sends a greeting
    try:
        transport = make_transport(SmtpUrl("127.0.0.1", listener.getsockname()[1], "none"), timeout=0.3)
        started = time.monotonic()
        reply = transport.send(SENDER, "a@example.net", message())
        assert reply.code is None
        assert "timed out" in reply.text
        assert time.monotonic() - started < 3
    finally:
        listener.close()


def test_non_ascii_envelope_address_does_not_raise(transport, handler):
    reply = transport.send(SENDER, "user@bücher.de", message())
    assert isinstance(reply, Reply) and reply.code != 250


# --- SmtpTransport: AUTH and TLS ----------------------------------------------------------------


class Authenticator:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.attempts: list[tuple[str, str, str]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.attempts.append((mechanism, login, password))
        return AuthResult(success=self.users.get(login) == password, handled=False)


@pytest.fixture
def auth_server(handler, recwarn):  # recwarn: aiosmtpd warns that AUTH without TLS is insecure, as it is
    authenticator = Authenticator({"mailer@example.com": "p@ss:w/rd%"})
    srv = Server(handler, authenticator=authenticator, auth_require_tls=False, auth_required=True).start()
    srv.authenticator = authenticator
    yield srv
    srv.stop()


def test_auth_with_percent_encoded_credentials_from_the_url(auth_server, handler, make_transport):
    url = SmtpUrl.parse(f"smtp://mailer%40example.com:p%40ss%3Aw%2Frd%25@127.0.0.1:{auth_server.port}?tls=none")
    transport = make_transport(url)
    assert transport.send(SENDER, "a@example.net", message(1)).code == 250
    assert transport.send(SENDER, "b@example.net", message(2)).code == 250
    assert [a[1:] for a in auth_server.authenticator.attempts] == [("mailer@example.com", "p@ss:w/rd%")]
    assert len(handler.received) == 2 and handler.connections == 1


def test_wrong_password_defers_with_the_auth_reply(auth_server, handler, make_transport):
    transport = make_transport(auth_server.url(username="mailer@example.com", password="wrong"))
    reply = transport.send(SENDER, "a@example.net", message())
    # Our credentials are wrong, not the message: deferred, so fixing the password delivers it.
    assert reply.code is None and "535 5.7.8" in reply.text
    assert classify(reply).verdict is Verdict.DEFERRED
    assert handler.received == []
    assert transport.connections_opened == 0


def test_without_credentials_an_auth_requiring_server_refuses_mail(auth_server, handler, make_transport):
    transport = make_transport(auth_server.url())
    reply = transport.send(SENDER, "a@example.net", message())
    assert reply.code == 530
    assert handler.received == []


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (trustme)."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, pem, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    server.cert_chain_pems[0].write_to_path(str(pem))
    server.private_key_pem.write_to_path(str(key))
    return ca_pem, pem, key


@pytest.fixture
def server_tls_context(certificates) -> ssl.SSLContext:
    _, pem, key = certificates
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem, key)
    return context


@pytest.fixture
def trust_test_ca(certificates, monkeypatch):
    """Make the transport's ssl.create_default_context() trust the test CA (and only the transport's)."""
    ca_pem = certificates[0]
    real = ssl.create_default_context
    contexts: list[ssl.SSLContext] = []

    def create_default_context(*args, **kwargs):
        context = real(*args, **kwargs)
        context.load_verify_locations(cafile=str(ca_pem))
        contexts.append(context)
        return context

    monkeypatch.setattr(smtp_transport, "ssl", types.SimpleNamespace(create_default_context=create_default_context))
    return contexts


def test_starttls(handler, make_transport, server_tls_context, trust_test_ca):
    srv = Server(handler, tls_context=server_tls_context, require_starttls=True).start()
    try:
        transport = make_transport(srv.url("starttls"))
        assert transport.send(SENDER, "a@example.net", message(1)).code == 250
        assert transport.send(SENDER, "b@example.net", message(2)).code == 250
        assert [r.tls for r in handler.received] == [True, True]
        assert handler.connections == 1
        # Certificate and host name are checked: the client used a verifying context.
        assert trust_test_ca and all(c.verify_mode == ssl.CERT_REQUIRED and c.check_hostname for c in trust_test_ca)
    finally:
        srv.stop()


def test_starttls_with_auth_over_tls(handler, make_transport, server_tls_context, trust_test_ca):
    authenticator = Authenticator({"mailer": "secret"})
    srv = Server(
        handler, tls_context=server_tls_context, require_starttls=True, authenticator=authenticator, auth_required=True
    ).start()  # auth_require_tls defaults to True
    try:
        transport = make_transport(srv.url("starttls", "mailer", "secret"))
        assert transport.send(SENDER, "a@example.net", message()).code == 250
        assert [a[1:] for a in authenticator.attempts] == [("mailer", "secret")]
        assert handler.received[0].tls
    finally:
        srv.stop()


def test_starttls_with_an_untrusted_certificate_fails_without_sending(handler, make_transport, server_tls_context):
    srv = Server(handler, tls_context=server_tls_context, require_starttls=True).start()
    try:
        transport = make_transport(srv.url("starttls"))
        reply = transport.send(SENDER, "a@example.net", message())
        assert reply.code is None
        assert "CERTIFICATE_VERIFY_FAILED" in reply.text
        assert handler.received == []
    finally:
        srv.stop()


def test_plain_connection_to_a_server_that_requires_starttls_is_refused(handler, make_transport, server_tls_context):
    srv = Server(handler, tls_context=server_tls_context, require_starttls=True).start()
    try:
        reply = make_transport(srv.url("none")).send(SENDER, "a@example.net", message())
        assert reply.code == 530
        assert handler.received == []
    finally:
        srv.stop()


def test_starttls_against_a_server_without_it_fails(server, handler, make_transport, trust_test_ca):
    reply = make_transport(server.url("starttls")).send(SENDER, "a@example.net", message())
    assert reply.code is None
    assert "STARTTLS" in reply.text
    assert handler.received == []


def test_implicit_tls(handler, make_transport, server_tls_context, trust_test_ca):
    srv = Server(handler, ssl_context=server_tls_context).start()
    try:
        transport = make_transport(srv.url("ssl"))
        assert transport.send(SENDER, "a@example.net", message(1)).code == 250
        assert transport.send(SENDER, "b@example.net", message(2)).code == 250
        assert len(handler.received) == 2 and handler.connections == 1
    finally:
        srv.stop()


# --- FileTransport, ConsoleTransport, MemoryTransport -------------------------------------------


def test_file_transport_writes_one_eml_per_message(tmp_path):
    directory = tmp_path / "deep" / "outbox"
    transport = FileTransport(directory)
    assert directory.is_dir()
    first = transport.send(SENDER, "a@example.net", message(1))
    second = transport.send(SENDER, "a@example.net", message(2))
    third = transport.send(SENDER, "b@example.net", message(3))
    assert {first.code, second.code, third.code} == {250}
    files = sorted(directory.iterdir())
    assert len(files) == 3
    assert all(f.suffix == ".eml" for f in files)
    assert sorted(f.read_bytes() for f in files) == sorted([message(1), message(2), message(3)])
    assert first.text.startswith("2.0.0 written to ") and first.text.split()[-1] in {f.name for f in files}
    assert classify(first).verdict is Verdict.SENT
    transport.close()  # a no-op
    assert len(list(directory.iterdir())) == 3


def test_file_transport_keeps_a_slash_in_the_recipient_out_of_the_path(tmp_path):
    transport = FileTransport(tmp_path)
    transport.send(SENDER, "../../etc/x@example.net", message())
    [written] = list(tmp_path.iterdir())
    assert written.parent == tmp_path
    assert "/" not in written.name and written.name.endswith("-.._.._etc_x@example.net.eml")


def test_file_transport_never_overwrites_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(transports.time, "time_ns", lambda: 1_700_000_000_000_000_000)  # a coarse clock
    transport = FileTransport(tmp_path)
    transport.send(SENDER, "a@example.net", message(1))
    transport.send(SENDER, "a@example.net", message(2))
    assert sorted(f.read_bytes() for f in tmp_path.iterdir()) == sorted([message(1), message(2)])


def test_console_transport_prints_the_message():
    stream = io.StringIO()
    transport = ConsoleTransport(stream)
    reply = transport.send(SENDER, "a@example.net", message(1) + b"bad utf-8: \xff\r\n")
    assert reply.code == 250 and classify(reply).verdict is Verdict.SENT
    output = stream.getvalue()
    assert output.startswith(f"--- message from {SENDER} to a@example.net\n")
    assert "Subject: message 1" in output
    assert "bad utf-8: \ufffd" in output


def test_console_transport_defaults_to_stdout(capsys):
    ConsoleTransport().send(SENDER, "a@example.net", message(7))
    assert "Subject: message 7" in capsys.readouterr().out


def test_memory_transport_keeps_messages_until_closed():
    transport = MemoryTransport()
    assert transport.send(SENDER, "a@example.net", message(1)).code == 250
    assert transport.send(SENDER, "b@example.net", message(2)).code == 250
    assert transport.outbox == [(SENDER, "a@example.net", message(1)), (SENDER, "b@example.net", message(2))]
    transport.close()
    assert transport.outbox == []


# --- build_transport / get_transport / set_transport --------------------------------------------


def _settings(**overrides) -> Settings:
    return Settings(default_sender=SENDER, secret_key="0123456789abcdef-secret", **overrides)


def test_build_transport_smtp_uses_the_settings():
    transport = build_transport(
        _settings(
            transport="smtp",
            smtp_url="smtp://u:p@relay.example.com:2525?tls=starttls",
            smtp_timeout=12.5,
            smtp_max_messages_per_connection=42,
            smtp_local_hostname="mailer.example.com",
        )
    )
    assert isinstance(transport, SmtpTransport)
    assert transport.url == SmtpUrl("relay.example.com", 2525, "starttls", "u", "p")
    assert (transport.timeout, transport.max_messages, transport.local_hostname) == (12.5, 42, "mailer.example.com")
    assert transport.connections_opened == 0  # nothing is opened until the first send


def test_build_transport_other_kinds(tmp_path):
    file_transport = build_transport(_settings(transport="file", file_transport_dir=tmp_path / "out"))
    assert isinstance(file_transport, FileTransport) and file_transport.directory == tmp_path / "out"
    assert isinstance(build_transport(_settings(transport="console")), ConsoleTransport)
    assert isinstance(build_transport(_settings(transport="memory")), MemoryTransport)


@pytest.fixture
def process_transport(monkeypatch):
    from smartmail.config.settings import get_settings

    for name in list(os.environ):
        if name.upper().startswith("SMARTMAIL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", SENDER)
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", "0123456789abcdef-secret")
    monkeypatch.setenv("SMARTMAIL_TRANSPORT", "memory")
    get_settings.forget()
    transports.set_transport(None)
    yield
    transports.set_transport(None)
    get_settings.forget()


def test_get_transport_builds_from_settings_once(process_transport):
    first = transports.get_transport()
    assert isinstance(first, MemoryTransport)
    assert transports.get_transport() is first


def test_set_transport_replaces_and_closes_the_previous_one(process_transport):
    old = MemoryTransport()
    transports.set_transport(old)
    assert transports.get_transport() is old
    old.send(SENDER, "a@example.net", message())
    new = MemoryTransport()
    transports.set_transport(new)
    assert transports.get_transport() is new
    assert old.outbox == []  # closed
    transports.set_transport(new)  # setting the same one again does not close it
    new.send(SENDER, "a@example.net", message())
    transports.set_transport(new)
    assert len(new.outbox) == 1


def test_connection_lost_after_the_body_is_unknown_not_retried(make_transport):
    """The relay reads the whole message, then hangs up without answering the final dot."""
    relay = HangingRelay(hang_up_at=1, pipelining=False)
    try:
        reply = make_transport(relay.url).send(SENDER, "a@example.net", message())
        assert reply.code is None and reply.stage == "data"
        assert classify(reply).verdict is Verdict.UNKNOWN
    finally:
        relay.close()


# --- Per-site pools and connection leases --------------------------------------------------------


class FakeGate:
    """A ConnectionGate in memory: grants up to `limit` leases per site."""

    lease_ms = 30_000

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.leases: dict[str, set[str]] = {}
        self.wanted_sites: set[str] = set()

    def lease_connection(self, site, lease):
        held = self.leases.setdefault(site.name, set())
        if len(held) >= self.limit:
            return False
        held.add(lease)
        return True

    def renew_connections(self, site_name, leases):
        return [lease for lease in leases if lease not in self.leases.get(site_name, set())]

    def release_connection(self, site_name, lease):
        self.leases.get(site_name, set()).discard(lease)

    def want_connection(self, site_name):
        self.wanted_sites.add(site_name)

    def wanted(self, site_names):
        return self.wanted_sites & set(site_names)


def site(name: str, max_connections: int = 1, max_messages: int = 100):
    from smartmail.workers.outcomes import RetrySchedule
    from smartmail.workers.policy import Site

    return Site(name, None, 1, max_connections, max_messages, RetrySchedule())


def test_each_site_has_its_own_pool_and_connection_limit(server, handler, make_transport):
    gate = FakeGate(limit=1)
    transport = make_transport(server.url(), gate=gate)
    google, yahoo = site("google"), site("yahoo", max_messages=2)
    for i in range(3):
        assert transport.send(SENDER, f"g{i}@gmail.com", message(i), google).code == 250
        assert transport.send(SENDER, f"y{i}@yahoo.com", message(i), yahoo).code == 250
    # One connection for google; yahoo's was retired after 2 messages and a second one opened.
    assert handler.connections == 3
    assert len(gate.leases["google"]) == 1 and len(gate.leases["yahoo"]) == 1  # the retired one gave its lease back


def test_a_site_at_its_limit_elsewhere_is_reported_not_attempted_and_marked_wanted(server, handler, make_transport):
    gate = FakeGate(limit=1)
    busy = site("busy")
    gate.lease_connection(busy, "another-process")
    transport = make_transport(server.url(), gate=gate)
    reply = transport.send(SENDER, "a@busy.example", message(), busy)
    assert reply.stage == transports.AT_CONNECTION_LIMIT and reply.code is None
    assert handler.connections == 0 and gate.wanted_sites == {"busy"}


def test_a_wanted_connection_used_within_the_grace_stays_open(server, handler, make_transport):
    # The holder keeps its lease while the site's work still comes to it: handing it over at every
    # pause would open a session per handover.
    gate = FakeGate(limit=1)
    transport = make_transport(server.url(), gate=gate)
    wanted = site("wanted")
    transport.send(SENDER, "a@wanted.example", message(), wanted)
    gate.want_connection("wanted")
    transport.close_wanted(time.monotonic() - transport.keep_wanted_for)
    assert len(gate.leases["wanted"]) == 1 and handler.connections == 1
    transport.close_wanted(time.monotonic() + 1)  # idle past the grace: given back
    assert gate.leases["wanted"] == set()


def test_idle_connections_of_a_wanted_site_close_and_give_back_their_leases(server, handler, make_transport):
    gate = FakeGate(limit=2)
    transport = make_transport(server.url(), gate=gate)
    wanted, other = site("wanted"), site("other")
    transport.send(SENDER, "a@wanted.example", message(), wanted)
    transport.send(SENDER, "b@other.example", message(), other)
    gate.want_connection("wanted")
    transport.close_wanted()
    assert gate.leases["wanted"] == set() and len(gate.leases["other"]) == 1
    deadline = time.monotonic() + 2
    while len(handler.quits) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(handler.quits) == 1
