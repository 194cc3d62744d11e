"""A cheap HTTP/1.1 load generator: keep-alive connections that write prebuilt requests.

A general-purpose client (httpx) spends about as much CPU per request as the
server it measures, so the load generator would be the limit. `HttpConnection`
is a bare asyncio protocol instead: requests are bytes built once, and of
each response it parses only the status line and ``Content-Length`` (no
chunked encoding: Herald always sends a length). One request is in flight
per connection at a time; concurrency comes from more connections.

On top of it: `fetch`, `fetch_many` and `request_sync` for set-up calls, `ClosedLoop` (each
connection sends its request again as soon as the answer is in: S4), and
`HttpBatchFeeder`, which feeds a `bench.loadgen.Publisher` through Herald's
batch endpoint ``POST /v1/publish``.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import Callable, Sequence
from typing import cast

from bench.loadgen import PLAIN_PAYLOAD, Totals, timestamp_payload

__all__ = [
    "BATCH_OK",
    "ClosedLoop",
    "HttpBatchFeeder",
    "HttpConnection",
    "build_request",
    "connect",
    "fetch",
    "fetch_many",
    "request_sync",
]

HOST = "127.0.0.1"
BATCH_OK = b'"status":201'
"""How a published item reads in a batch answer (orjson writes no spaces)."""
_MAX_HEAD = 64 * 1024

OnResponse = Callable[["HttpConnection", int, bytes], None]


def build_request(
    method: str, path: str, port: int, key: str | None = None, body: bytes | None = None
) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request (JSON body when ``body``)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def request_sync(
    port: int,
    method: str,
    path: str,
    key: str | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One blocking request for set-up outside the event loop: (status, body).

    Raises `OSError` when nothing answers.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection: write a request, get ``on_response(conn, status, body)``."""

    def __init__(self, on_response: OnResponse, keep_body: bool = True) -> None:
        self.on_response = on_response
        self.keep_body = keep_body
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.items = 0
        """What the caller sent in the request in flight (a batch's item count)."""
        self.error: str | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._status = 0
        self._body_left = -1  # -1: reading the head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Note an unexpected end."""
        if self.in_flight and self.error is None:
            self.error = f"connection lost with a request in flight ({exc or 'eof'})"
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, request: bytes) -> None:
        """Send one request (the answer comes through ``on_response``)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError(self.error or "the connection is closed")
        self.in_flight += 1
        self.transport.write(request)

    def close(self) -> None:
        """Drop the connection."""
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, text: str) -> None:
        self.error = text
        self.close()

    def data_received(self, data: bytes) -> None:
        """Cut the stream into responses: status line, Content-Length, body."""
        buffer = self._buffer
        buffer += data
        while True:
            if self._body_left < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        self._fail("response head too long")
                    return
                head = bytes(buffer[:end]).lower()
                del buffer[: end + 4]
                try:
                    self._status = int(head[9:12])
                    at = head.index(b"\r\ncontent-length:") + 17
                    stop = head.find(b"\r\n", at)
                    self._body_left = int(head[at : stop if stop >= 0 else len(head)])
                except ValueError:
                    self._fail(f"cannot read response head {head[:200]!r}")
                    return
            if len(buffer) < self._body_left:
                return
            length = self._body_left
            body = bytes(buffer[:length]) if self.keep_body else b""
            del buffer[:length]
            self._body_left = -1
            self.in_flight -= 1
            self.on_response(self, self._status, body)


async def connect(port: int, on_response: OnResponse, keep_body: bool = True) -> HttpConnection:
    """Open one keep-alive connection to 127.0.0.1:``port``."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: HttpConnection(on_response, keep_body), HOST, port
    )
    return conn


async def fetch_many(
    port: int, requests: Sequence[bytes], concurrency: int = 8, within: float = 120.0
) -> list[tuple[int, bytes]]:
    """Send every request over ``concurrency`` keep-alive connections; answers in order."""
    loop = asyncio.get_running_loop()
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    done: asyncio.Future[None] = loop.create_future()
    state = {"next": 0, "left": len(requests)}
    slot: dict[HttpConnection, int] = {}

    def feed(conn: HttpConnection) -> None:
        index = state["next"]
        if index < len(requests):
            state["next"] = index + 1
            slot[conn] = index
            conn.write(requests[index])

    def answered(conn: HttpConnection, status: int, body: bytes) -> None:
        answers[slot[conn]] = (status, body)
        state["left"] -= 1
        if state["left"] == 0 and not done.done():
            done.set_result(None)
        feed(conn)

    if not requests:
        return answers
    conns = [await connect(port, answered) for _ in range(min(concurrency, len(requests)))]
    try:
        for conn in conns:
            feed(conn)
        lost = [conn.lost for conn in conns]
        async with asyncio.timeout(within):
            await asyncio.wait([done, *lost], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            errors = [conn.error for conn in conns if conn.error]
            raise ConnectionError(f"HTTP requests failed: {errors[:3]}")
    finally:
        for conn in conns:
            conn.close()
    return answers


async def fetch(
    port: int, method: str, path: str, key: str | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    answers = await fetch_many(port, [build_request(method, path, port, key, body)], 1, 30.0)
    return answers[0]


class ClosedLoop:
    """``connections`` keep-alive connections, each sending ``request`` again on every answer.

    ``count_items`` turns a response body into the number of items it
    confirms (a batch); without it each response with status ``ok_status``
    counts as one.
    """

    def __init__(
        self,
        port: int,
        request: bytes,
        connections: int,
        *,
        ok_status: int,
        count_items: Callable[[bytes], int] | None = None,
    ) -> None:
        self.port = port
        self.request = request
        self.connections = connections
        self.ok_status = ok_status
        self.count_items = count_items
        self.responses = 0
        self.ok = 0
        self.items = 0
        self.statuses: dict[int, int] = {}
        self.examples: list[str] = []
        self._conns: list[HttpConnection] = []
        self._running = False
        self._drained: asyncio.Future[None] | None = None

    def _answered(self, conn: HttpConnection, status: int, body: bytes) -> None:
        self.responses += 1
        if status == self.ok_status:
            self.ok += 1
            self.items += self.count_items(body) if self.count_items else 1
        else:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if len(self.examples) < 5:
                self.examples.append(f"{status} {body[:200]!r}")
        if self._running:
            conn.write(self.request)
        elif self._drained is not None and not self._drained.done() and self._settled():
            self._drained.set_result(None)

    def _settled(self) -> bool:
        return not any(c.in_flight and c.error is None for c in self._conns)

    async def start(self) -> None:
        """Open the connections and send the first request on each."""
        keep_body = self.count_items is not None
        for _ in range(self.connections):
            self._conns.append(
                await connect(self.port, self._answered, keep_body or len(self.examples) < 5)
            )
        self._running = True
        for conn in self._conns:
            conn.write(self.request)

    def errors(self) -> list[str]:
        """Connection errors so far."""
        return [conn.error for conn in self._conns if conn.error]

    async def stop(self, within: float = 10.0) -> None:
        """Stop sending, wait (a bounded time) for the answers in flight, close."""
        self._running = False
        if not self._settled():
            self._drained = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._drained], timeout=within)
        for conn in self._conns:
            conn.close()


class HttpBatchFeeder:
    """Feeds a `Publisher` through ``POST /v1/publish``, one request in flight per connection.

    Messages wait in a queue while every connection has a request in flight;
    the next free connection takes up to ``batch_max`` of them at once. Each
    message's timestamp (on sampled ones) is taken when its request is
    built, so time spent queued here is not part of the measured latency.
    Every item of an answered request counts as answered; items the answer
    does not confirm with status 201 are recorded as client errors.
    """

    def __init__(
        self, totals: Totals, port: int, key: str, channels: list[str], batch_max: int
    ) -> None:
        self.totals = totals
        self.port = port
        self.batch_max = batch_max
        self.description = (
            f"HTTP batch POST /v1/publish (up to {batch_max} items a request, keep-alive)"
        )
        self._head = (
            f"POST /v1/publish HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n"
        ).encode()
        self._prefixes = [b'{"channel":"%s","payload":"' % c.encode() for c in channels]
        self._plain = [p + PLAIN_PAYLOAD + b'"}' for p in self._prefixes]
        self._conns: list[HttpConnection] = []
        self._idle: list[HttpConnection] = []
        self._next = 0
        self._pending = 0
        self._every = 1
        self.requests = 0

    async def open(self, connections: int) -> None:
        """Open the keep-alive connections."""
        for _ in range(connections):
            conn = await connect(self.port, self._answered)
            self._conns.append(conn)
            self._idle.append(conn)

    def send(self, first: int, count: int, every: int) -> None:
        """Queue messages ``first``.. and start requests on the free connections."""
        if self._pending == 0:
            self._next = first
        self._pending += count
        self._every = every
        self._dispatch()

    def _dispatch(self) -> None:
        idle = self._idle
        while self._pending and idle:
            conn = idle.pop()
            count = min(self._pending, self.batch_max)
            first = self._next
            self._next += count
            self._pending -= count
            every, prefixes, plain = self._every, self._prefixes, self._plain
            channels = len(prefixes)
            stamp = timestamp_payload(time.time_ns())
            items = [
                prefixes[n % channels] + stamp + b'"}' if n % every == 0 else plain[n % channels]
                for n in range(first, first + count)
            ]
            body = b"[" + b",".join(items) + b"]"
            conn.items = count
            self.requests += 1
            try:
                conn.write(self._head % len(body) + body)
            except ConnectionError as exc:
                self.totals.error(f"batch publish: {exc}")

    def _answered(self, conn: HttpConnection, status: int, body: bytes) -> None:
        totals = self.totals
        count = conn.items
        totals.acked += count
        if status != 200:
            totals.error(f"batch publish answered {status}: {body[:200]!r}")
        else:
            ok = body.count(BATCH_OK)
            if ok != count:
                totals.error(f"batch publish: {count - ok} of {count} items failed: {body[:200]!r}")
        self._idle.append(conn)
        self._dispatch()
        totals.poke()

    def close(self) -> None:
        """Drop the connections."""
        for conn in self._conns:
            conn.close()
