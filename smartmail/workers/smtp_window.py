"""Drivers of SMTP transactions written as generators: one at a time, blocking, or a window's side by side from one thread."""
from __future__ import annotations

import selectors
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import structlog

from smartmail.outcomes import Reply

log = structlog.get_logger("smartmail.smtp")


# What a transaction (SmtpTransport._transaction) asks of the driver that runs it. `conn` is a
# transports._Connection: its `smtp` (an smtplib.SMTP with a session open) and `inbox` (bytes
# received and not yet parsed).
class Write(NamedTuple):
    conn: Any
    data: bytes


class Read(NamedTuple):
    """One reply; `timeout`: seconds to wait for it, None for the connection's own."""
    conn: Any
    timeout: float | None = None


class Acquire(NamedTuple):
    """A connection: `now()` returns one without waiting, or None; `wait()` may connect or wait."""
    now: Callable[[], Any]
    wait: Callable[[], Any]


Transaction = Generator[Write | Read | Acquire, Any, Reply]


def run(transaction: Transaction) -> Reply:
    """Run one transaction with blocking calls (smtplib's own reads)."""
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
            elif isinstance(request, Read):
                value = _read_blocking(request)
            else:
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
            if len(inbox) - start > smtplib._MAXLINE:
                raise smtplib.SMTPResponseException(500, "Line too long.")
            return None
        line = bytes(inbox[start:end + 1])
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


def run_window(transactions: Sequence[Transaction], parallelism: int, connector: ThreadPoolExecutor) -> list[Reply]:
    """Run the transactions, up to `parallelism` at a time, from this thread: replies are read as
    they arrive on each connection (selectors), so no transaction waits for another's server.
    Connections that must be opened (or waited for) are got by `connector`'s threads meanwhile.

    Threads blocking on their own connections cost a worker ~130 us of CPU a message in GIL
    hand-offs (a single-process delivery of a campaign, same run: 472-503 us a message threaded,
    349 us with this loop)."""
    replies: list[Reply | None] = [None] * len(transactions)
    waiting = iter(enumerate(transactions))
    reads: dict[int, tuple[int, Transaction, Any, float]] = {}  # fd -> (index, transaction, conn, deadline)
    acquiring: dict[Future, tuple[int, Transaction]] = {}
    selector = selectors.DefaultSelector()
    wake: list[socket.socket] = []  # a socket pair, made when a connection is first waited for
    active = 0

    def waker() -> socket.socket:
        if not wake:
            wake.extend(socket.socketpair())
            wake[0].setblocking(False)
            selector.register(wake[0], selectors.EVENT_READ)
        return wake[1]

    def advance(index: int, transaction: Transaction, value: Any = None, error: BaseException | None = None) -> None:
        """Resume a transaction until it must wait for a reply or a connection, or ends."""
        nonlocal active
        while True:
            try:
                request = transaction.throw(error) if error else transaction.send(value)
            except StopIteration as stop:
                replies[index] = stop.value
                active -= 1
                return
            except Exception as exc:  # noqa: BLE001 - a transport bug must not lose the window's other replies
                log.exception("transport.error")
                replies[index] = Reply(None, f"transport error: {exc!r}", "data")
                active -= 1
                return
            value, error = None, None
            try:
                if isinstance(request, Write):
                    request.conn.smtp.send(request.data)
                elif isinstance(request, Read):
                    value = take_reply(request.conn.inbox)
                    if value is None:
                        sock = request.conn.smtp.sock
                        if sock is None:
                            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
                        timeout = request.timeout if request.timeout is not None else request.conn.smtp.timeout
                        reads[sock.fileno()] = (index, transaction, request.conn, time.monotonic() + timeout)
                        selector.register(sock, selectors.EVENT_READ)
                        return
                else:
                    value = request.now()
                    if value is None:
                        wake_w = waker()
                        future = connector.submit(request.wait)
                        acquiring[future] = (index, transaction)
                        future.add_done_callback(lambda _: _wake(wake_w))
                        return
            except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
                error = exc

    def answered(fd: int, value: Any = None, error: BaseException | None = None) -> None:
        """The reply (or failure) a transaction waited for on `fd`: stop watching it, resume."""
        index, transaction, _, _ = reads.pop(fd)
        selector.unregister(fd)
        advance(index, transaction, value, error)

    def start_more() -> None:
        nonlocal active
        while active < parallelism:
            nxt = next(waiting, None)
            if nxt is None:
                return
            active += 1
            advance(*nxt)

    try:
        start_more()
        while active:
            timeout = min((entry[3] for entry in reads.values()), default=None)
            if timeout is not None:
                timeout = max(0.0, timeout - time.monotonic())
            for key, _ in selector.select(timeout):
                if wake and key.fileobj is wake[0]:
                    _drain_wake(wake[0])
                    for future in [f for f in acquiring if f.done()]:
                        index, transaction = acquiring.pop(future)
                        error = future.exception()
                        advance(index, transaction, None if error else future.result(), error)
                    continue
                fd = key.fd
                if fd not in reads or reads[fd][2].smtp.sock is not key.fileobj:
                    continue  # an event of a socket closed and replaced earlier in this round
                conn = reads[fd][2]
                try:
                    data = _receive(conn.smtp.sock)
                    if not data:
                        raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
                    conn.inbox += data
                    reply = take_reply(conn.inbox)
                except Exception as exc:  # noqa: BLE001 - the transaction decides what a failure means
                    answered(fd, error=exc)
                    continue
                if reply is not None:
                    answered(fd, reply)
            now = time.monotonic()
            for fd in [fd for fd, entry in reads.items() if entry[3] <= now]:
                answered(fd, error=TimeoutError("timed out"))
            start_more()
    finally:
        selector.close()
        for sock in wake:
            sock.close()
    return replies  # type: ignore[return-value]


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
