#!/usr/bin/env python3
"""A fast webhook receiver for the benchmarks: HTTP/1.1 keep-alive on loopback, 200 to every POST, counted per port.

    python scripts/bench_webhooks_receiver.py --ok 8001 --ok 8002 --hang 8003 --stats 8000

--ok ports answer every request `200 ok` (Content-Length bodies only, as httpx and requests send
them; pipelined requests are answered in order). --hang ports accept connections, read, and never
answer (an endpoint that is down the hard way). GET on the --stats port answers one JSON object:
{"<port>": [requests, body bytes, first request (time.time()), last request], ...}.
Nothing is parsed beyond the request head's Content-Length: the receiver must never be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class Counter:
    """One port's requests, body bytes, and the times of its first and last request."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.first = 0.0
        self.last = 0.0

    def count(self, body_bytes: int) -> None:
        now = time.time()
        if not self.requests:
            self.first = now
        self.requests += 1
        self.bytes += body_bytes
        self.last = now


class Answering(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buffer = bytearray()

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        answers = 0
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            length = _content_length(bytes(buffer[:head_end]))
            end = head_end + 4 + length
            if len(buffer) < end:
                break
            del buffer[:end]
            self.counter.count(length)
            answers += 1
        if answers:
            self.transport.write(OK * answers)


def _content_length(head: bytes) -> int:
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    value_end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : value_end if value_end >= 0 else len(head)])


class Hanging(asyncio.Protocol):
    """Reads and never answers."""

    def data_received(self, data: bytes) -> None:
        pass


class Stats(asyncio.Protocol):
    def __init__(self, counters: dict[int, Counter]) -> None:
        self.counters = counters

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        body = json.dumps(
            {str(port): [c.requests, c.bytes, c.first, c.last] for port, c in self.counters.items()}
        ).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


async def serve(ok: list[int], hang: list[int], stats: int) -> None:
    loop = asyncio.get_running_loop()
    counters = {port: Counter() for port in ok}
    servers = [
        await loop.create_server(lambda c=counters[port]: Answering(c), "127.0.0.1", port, backlog=1024) for port in ok
    ]
    servers += [await loop.create_server(Hanging, "127.0.0.1", port, backlog=1024) for port in hang]
    servers.append(await loop.create_server(lambda: Stats(counters), "127.0.0.1", stats))
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ok", type=int, action="append", default=[], help="a port answering 200")
    parser.add_argument("--hang", type=int, action="append", default=[], help="a port that never answers")
    parser.add_argument("--stats", type=int, required=True, help="the port answering GET with the counters")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.ok, args.hang, args.stats))


if __name__ == "__main__":
    main()
