"""Drivers of SMTP transactions written as generators: one at a time, or a window's side by side from one thread."""

from __future__ import annotations

import selectors
import smtplib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import structlog

from smartmail.workers.outcomes import Reply

_MAXLINE = getattr(smtplib, "_MAXLINE", 8192)  # smtplib's own limit on a reply line
log = structlog.get_logger("smartmail.smtp")


# What a transaction (SmtpTransport._transaction) asks of the driver that runs it. `conn` is a
# smtp_transport._Connection: its `smtp` (an smtplib.SMTP with a session open) and `inbox` (bytes
# received and not yet parsed).
class Write(NamedTuple):
    conn: Any
    data: bytes


class Transmit(NamedTuple):
    """A Write of a message's content, final dot included: `key` (the message id) must be marked
    as transmitted first (workers/ownership.py), and the content goes only if it was."""

    conn: Any
    data: bytes
    key: str


class NotTransmitted(Exception):
    """A message's content was not sent: its write-ahead mark could not be made."""


class Read(NamedTuple):
    """One reply; `timeout`: seconds to wait for it, None for the connection's own."""

    conn: Any
    timeout: float | None = None


class Acquire(NamedTuple):
    """A connection: `now()` returns one without waiting, or None; `wait()` may connect or wait.
    With a `pool`, a connection of that pool lent within the window may be given instead."""

    now: Callable[[], Any]
    wait: Callable[[], Any]
    pool: str | None = None


class Lend(NamedTuple):
    """`conn` may carry the commands of the window's next transaction for `pool` while this one
    waits for its last reply, which the transaction reads next (yield nothing else in between).
    RFC 2920 section 3.1: message content may be the first command of a pipelined group, so the
    next MAIL, RCPT and DATA go in the same write as this body. `share()` is what the borrower's
    Acquire receives."""

    conn: Any
    pool: str
    share: Callable[[], Any]


Transaction = Generator[Write | Transmit | Read | Acquire | Lend, Any, Reply]
# Marks `keys` as about to be transmitted, in one call; False: none of them may be.
Marker = Callable[[Sequence[str]], bool]


def run(transaction: Transaction, marker: Marker | None = None) -> Reply:
    """Run one transaction with blocking calls (smtplib's own reads); nothing is lent."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = transaction.throw(error) if error else transaction.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(request, Write):
                request.conn.smtp.send(request.data)
            elif isinstance(request, Transmit):
                if marker is not None and not marker([request.key]):
                    raise NotTransmitted("the write-ahead mark could not be made")
                request.conn.smtp.send(request.data)
            elif isinstance(request, Read):
                value = _read_blocking(request)
            elif isinstance(request, Acquire):
                value = request.wait()
        except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
            error = exc


def _read_blocking(request: Read) -> tuple[int, bytes]:
    smtp = request.conn.smtp
    if request.timeout is None or smtp.sock is None:
        return smtp.getreply()
    smtp.sock.settimeout(request.timeout)
    try:
        return smtp.getreply()
    finally:
        if smtp.sock is not None:
            smtp.sock.settimeout(smtp.timeout)


def take_reply(inbox: bytearray) -> tuple[int, bytes] | None:
    """The first complete reply in `inbox`, removed from it, parsed as smtplib.SMTP.getreply
    does (multiline replies joined with LF; code -1 when not a number); None when incomplete."""
    lines = []
    start = 0
    while True:
        end = inbox.find(b"\n", start)
        if end < 0:
            if len(inbox) - start > _MAXLINE:
                raise smtplib.SMTPResponseException(500, "Line too long.")
            return None
        line = bytes(inbox[start : end + 1])
        start = end + 1
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            break
    del inbox[:start]
    try:
        code = int(line[:3])
    except ValueError:
        code = -1
    return code, b"\n".join(lines)


def run_window(
    transactions: Sequence[Transaction],
    parallelism: int,
    connector: ThreadPoolExecutor,
    marker: Marker | None = None,
    keys: Sequence[str | None] = (),
) -> list[Reply]:
    """Run the transactions over up to `parallelism` connections, from this thread: replies are
    read as they arrive on each connection (selectors), so no transaction waits for another's
    server. Connections that must be opened (or waited for) are got by `connector`'s threads.

    A transaction that lends its connection (Lend) hands it, and its place among the
    `parallelism`, to the next transaction of the same pool: that one's commands queue behind
    the body, its replies behind the lender's last. Writes wait until every transaction that can
    run has run, then go out as one send per connection: one write and one wake-up a message on
    a busy connection instead of two.

    One thread instead of one per connection: threads blocking on their own connections spend
    the worker's CPU on GIL hand-offs.

    With a `marker`, content (Transmit) goes out only once its key is marked: before each flush,
    one call marks the keys of the contents about to go and of up to 2 × `parallelism` transactions
    after them (`keys`: each transaction's), so that a crash leaves few marked messages that were
    not in fact transmitted, for a call per few messages rather than per message."""
    return _Window(transactions, parallelism, connector, marker, keys).run()


_PENDING = object()  # _Window.acquire: the transaction waits (parked, or for the connector)


class _Window:
    """The state of one run_window call; each method is a step of its event loop."""

    __slots__ = (
        "parallelism",
        "connector",
        "replies",
        "waiting",
        "running",
        "slots",
        "parked",
        "lendings",
        "donors",
        "readers",
        "deadlines",
        "unsent",
        "watched",
        "acquiring",
        "selector",
        "wake",
        "marker",
        "keys",
        "marked",
        "unmarked",
        "mark_from",
    )

    def __init__(
        self,
        transactions: Sequence[Transaction],
        parallelism: int,
        connector: ThreadPoolExecutor,
        marker: Marker | None = None,
        keys: Sequence[str | None] = (),
    ) -> None:
        self.marker = marker
        self.keys = keys
        self.marked: set[str] = set()
        self.unmarked: dict[Any, list[str]] = {}  # conn -> keys of its unsent content not yet marked
        self.mark_from = 0  # the marks look ahead from here, in transaction order
        self.parallelism = parallelism
        self.connector = connector
        self.replies: list[Reply | None] = [None] * len(transactions)
        self.waiting = deque(enumerate(transactions))
        self.running = 0
        self.slots: set[int] = set()  # transactions holding one of the `parallelism` connections
        self.parked: deque[tuple[int, Transaction, Acquire]] = deque()  # started to borrow, found nothing to borrow
        self.lendings: dict[int, Lend] = {}  # lender -> its connection that may be borrowed, oldest first
        self.donors: dict[int, int] = {}  # borrower -> the lender whose slot it holds
        # conn -> (index, transaction, timeout) of the transactions waiting for its replies, in reply order
        self.readers: dict[Any, deque[tuple[int, Transaction, float]]] = {}
        self.deadlines: dict[Any, float] = {}  # conn -> when its first reader gives up
        self.unsent: dict[Any, list[bytes]] = {}
        self.watched: dict[Any, socket.socket] = {}  # conn -> its socket registered in the selector
        self.acquiring: dict[Future, tuple[int, Transaction]] = {}
        self.selector = selectors.DefaultSelector()
        self.wake: list[socket.socket] = []  # a socket pair, made when a connection is first waited for

    def run(self) -> list[Reply]:
        watched, readers = self.watched, self.readers
        try:
            self.start_more()
            while self.running:
                for conn in [conn for conn in watched if conn not in readers]:
                    self.unwatch(conn)  # back in the pool, or closed: another thread may use it now
                if not self.flush():
                    self.start_more()  # ended or freed a slot: look again before waiting, or nothing may wake us
                    continue
                self.poll()
                now = time.monotonic()
                for conn in [conn for conn, deadline in self.deadlines.items() if deadline <= now]:
                    self.fail(conn, TimeoutError("timed out"))
                self.start_more()
        finally:
            self.selector.close()
            for sock in self.wake:
                sock.close()
        return self.replies  # type: ignore[return-value]

    def poll(self) -> None:
        """Wait for replies (until the nearest reader's deadline) and hand out what arrived."""
        watched = self.watched
        timeout = min(self.deadlines.values(), default=None)
        if timeout is not None:
            timeout = max(0.0, timeout - time.monotonic())
        for key, _ in self.selector.select(timeout):
            conn = key.data
            if conn is None:  # the wake-up socket: connections got by the connector
                self.connected()
                continue
            if watched.get(conn) is not key.fileobj:
                continue  # an event of a socket unwatched earlier in this round
            try:
                data = _receive(key.fileobj)
                if not data:
                    raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
                self.fail(conn, exc)
                continue
            conn.inbox += data
            self.serve(conn)

    def connected(self) -> None:
        """Resume the transactions whose connection the connector got (or failed to get)."""
        _drain_wake(self.wake[0])
        acquiring = self.acquiring
        for future in [f for f in acquiring if f.done()]:
            index, transaction = acquiring.pop(future)
            error = future.exception()
            self.advance(index, transaction, None if error else future.result(), error)

    def start_more(self) -> None:
        waiting, parked, lendings, slots = self.waiting, self.parked, self.lendings, self.slots
        # A lent connection first: the next transaction borrows it, or parks to wait for a slot.
        while lendings and waiting and not parked:
            self.running += 1
            self.advance(*waiting.popleft())
        while parked and self.lender_of(parked[0][2].pool) is not None:
            index, transaction, acquire = parked.popleft()
            self.advance(index, transaction, request=acquire)
        while len(slots) < self.parallelism and (parked or waiting):
            if parked:
                index, transaction, acquire = parked.popleft()
                slots.add(index)
                self.advance(index, transaction, request=acquire)
            else:
                index, transaction = waiting.popleft()
                self.running += 1
                slots.add(index)
                self.advance(index, transaction)

    def advance(
        self,
        index: int,
        transaction: Transaction,
        value: Any = None,
        error: BaseException | None = None,
        request: Any = None,
    ) -> None:
        """Resume a transaction (or take up its `request`) until it must wait for a reply or a
        connection, or ends."""
        unsent, readers = self.unsent, self.readers
        while True:
            if request is None:
                try:
                    request = transaction.throw(error) if error else transaction.send(value)
                except StopIteration as stop:
                    return self.end(index, stop.value)
                except Exception as exc:  # noqa: BLE001 - a transport bug must not lose the window's other replies
                    log.exception("transport.error")
                    return self.end(index, Reply(None, f"transport error: {exc!r}", "data"))
                value, error = None, None
            try:
                if isinstance(request, Write):
                    unsent.setdefault(request.conn, []).append(request.data)
                elif isinstance(request, Transmit):
                    unsent.setdefault(request.conn, []).append(request.data)
                    if self.marker is not None and request.key not in self.marked:
                        self.unmarked.setdefault(request.conn, []).append(request.key)
                elif isinstance(request, Read):
                    if request.conn in readers or (value := take_reply(request.conn.inbox)) is None:
                        return self.wait_for_reply(index, transaction, request)
                elif isinstance(request, Lend):
                    self.lendings[index] = request
                elif (value := self.acquire(index, transaction, request)) is _PENDING:
                    return
            except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
                error = exc
            request = None

    def acquire(self, index: int, transaction: Transaction, request: Acquire) -> Any:
        """A connection for the transaction now, or _PENDING: parked for a slot, or the connector's."""
        if (lender := self.lender_of(request.pool)) is not None:
            return self.borrow(index, lender)
        if index not in self.slots:
            self.parked.append((index, transaction, request))
            return _PENDING
        if (conn := request.now()) is not None:
            return conn
        wake_w = self.waker()
        future = self.connector.submit(request.wait)
        self.acquiring[future] = (index, transaction)
        future.add_done_callback(lambda _: _wake(wake_w))
        return _PENDING

    def lender_of(self, pool: str | None) -> int | None:
        return next((lender for lender, lending in self.lendings.items() if lending.pool == pool), None)

    def borrow(self, index: int, lender: int) -> Any:
        """The lender's connection, and its slot when the borrower has none."""
        lending = self.lendings.pop(lender)
        slots = self.slots
        if lender in slots and index not in slots:
            slots.remove(lender)
            slots.add(index)
            self.donors[index] = lender
        return lending.share()

    def end(self, index: int, reply: Reply) -> None:
        replies, slots = self.replies, self.slots
        replies[index] = reply
        self.running -= 1
        lender = self.donors.pop(index, None)
        if index in slots:
            slots.remove(index)
            if lender is not None and replies[lender] is None:
                slots.add(lender)  # a borrower held back (ready() said no): the lender still uses the connection
        self.lendings.pop(index, None)

    def wait_for_reply(self, index: int, transaction: Transaction, request: Read) -> None:
        conn = request.conn
        if conn.smtp.sock is None:
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
        timeout = request.timeout if request.timeout is not None else conn.smtp.timeout
        readers = self.readers
        if conn not in readers:
            readers[conn] = deque()
            self.deadlines[conn] = time.monotonic() + timeout
            self.watch(conn)
        readers[conn].append((index, transaction, timeout))

    def serve(self, conn: Any) -> None:
        """Hand the replies in the connection's inbox to its readers, first come first served."""
        readers, deadlines = self.readers, self.deadlines
        while queue := readers.get(conn):
            try:
                reply = take_reply(conn.inbox)
            except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
                return self.fail(conn, exc)
            if reply is None:
                return
            index, transaction, _ = queue.popleft()
            if queue:
                deadlines[conn] = time.monotonic() + queue[0][2]
            else:
                del readers[conn], deadlines[conn]
            self.deliver(index, transaction, reply)

    def deliver(
        self, index: int, transaction: Transaction, value: Any = None, error: BaseException | None = None
    ) -> None:
        self.lendings.pop(index, None)  # a lender's last reply (or failure): its connection is no longer to be borrowed
        self.advance(index, transaction, value, error)

    def fail(self, conn: Any, error: BaseException) -> None:
        """The connection broke (or timed out): every transaction waiting on it gets the error."""
        self.unwatch(conn)
        self.unsent.pop(conn, None)
        self.unmarked.pop(conn, None)
        self.deadlines.pop(conn, None)
        for index, transaction, _ in self.readers.pop(conn, ()):
            self.deliver(index, transaction, error=error)

    def flush(self) -> bool:
        """Send what was written; False if a send failed (its transactions moved on meanwhile)."""
        unsent = self.unsent
        sent = True
        if self.unmarked and not self.mark():
            for conn in list(self.unmarked):
                self.fail(conn, NotTransmitted("the write-ahead mark could not be made"))
            self.unmarked.clear()
            sent = False
        while unsent:
            conn, parts = unsent.popitem()
            try:
                conn.smtp.send(parts[0] if len(parts) == 1 else b"".join(parts))
            except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
                self.fail(conn, exc)
                sent = False
        return sent

    def mark(self) -> bool:
        """Mark the keys of content about to go, and of the next transactions up to 2 × `parallelism`."""
        wanted = [key for keys in self.unmarked.values() for key in keys]
        keys, replies, marked = self.keys, self.replies, self.marked
        ahead = 0
        while self.mark_from < len(keys) and ahead < 2 * self.parallelism:
            index = self.mark_from
            self.mark_from += 1
            key = keys[index]
            if key is not None and key not in marked and replies[index] is None and key not in wanted:
                wanted.append(key)
                ahead += 1
        assert self.marker is not None
        if not self.marker(wanted):
            return False
        marked.update(wanted)
        self.unmarked.clear()
        return True

    def watch(self, conn: Any) -> None:
        """Register the connection's socket, and keep it while readers follow one another on it."""
        sock = conn.smtp.sock
        if self.watched.get(conn) is sock:
            return
        self.unwatch(conn)
        self.register(sock, conn)
        self.watched[conn] = sock

    def unwatch(self, conn: Any) -> None:
        if (sock := self.watched.pop(conn, None)) is not None:
            self.selector.unregister(sock)

    def register(self, sock: socket.socket, data: Any) -> None:
        stale = self.selector.get_map().get(sock.fileno())
        if stale is not None:  # a connection's socket, closed since, whose number this one reuses
            self.unwatch(stale.data)
        self.selector.register(sock, selectors.EVENT_READ, data)

    def waker(self) -> socket.socket:
        wake = self.wake
        if not wake:
            wake.extend(socket.socketpair())
            wake[0].setblocking(False)
            self.register(wake[0], None)
        return wake[1]


def _receive(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    while isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes the selector cannot see
        data += sock.recv(sock.pending())
    return data


def _wake(wake_w: socket.socket) -> None:
    try:
        wake_w.send(b"\0")
    except OSError:  # the window ended meanwhile
        pass


def _drain_wake(wake_r: socket.socket) -> None:
    try:
        while wake_r.recv(4096):
            pass
    except BlockingIOError:
        pass
