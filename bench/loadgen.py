"""Load generator of the benchmarks: cheap hand-rolled WebSocket clients and a paced publisher.

A thousand receivers must not cost more than the server they measure, so
they do not use a WebSocket library. `WsClient` is a bare asyncio protocol:
it writes the HTTP upgrade request itself, checks the ``101`` answer, sends
masked client frames, and on the receive path reads only the 2/4/10-byte
headers of the server's (unmasked) frames to count complete data frames.
It decodes JSON only while setting up, for the first message frame it gets
(a one-off correctness check), and, on the few *probe* connections, for the
frames that carry a publish timestamp.

`Publisher` sends messages through a `Feeder` (`WsFeeder` here: ``publish``
frames on one more `WsClient`; HTTP batches and Redis PUBLISH live in
`bench.httpload` and `bench.resp`) either as fast as the bounds allow or at
a target rate. Two bounds keep every run honest: at most ``window``
publishes without an answer, and at most ``backlog`` messages not yet
received by all their subscribers, so a load generator that falls behind
slows the publisher down instead of piling up a backlog the server would
(rightly) close as a slow consumer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import orjson

__all__ = [
    "PAYLOAD_BYTES",
    "PLAIN_PAYLOAD",
    "Feeder",
    "Publisher",
    "Role",
    "StepCounts",
    "Totals",
    "WsClient",
    "WsFeeder",
    "client_frame",
    "open_client",
    "timestamp_payload",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "herald.json"
PAYLOAD_BYTES = 64
"""Length of every published payload string, timestamped or not."""

_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_FIN_TEXT = 0x81  # FIN + text: every frame the server sends on herald.json data
_MAX_HANDSHAKE = 16 * 1024
_SAMPLE_MARK = b'"payload":"T'
PLAIN_PAYLOAD = b"P" * PAYLOAD_BYTES
"""The payload of every message that carries no timestamp."""

Role = Literal["subscriber", "probe", "publisher"]


def timestamp_payload(ns: int) -> bytes:
    """A ``PAYLOAD_BYTES`` payload carrying a ``time.time_ns()`` value: ``T<ns>....``."""
    head = b"T%d" % ns
    return head + b"." * (PAYLOAD_BYTES - len(head))


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(
        n, "little"
    )


def client_frame(payload: bytes, opcode: int = _OP_TEXT) -> bytes:
    """One masked, unfragmented client frame (RFC 6455 section 5.3)."""
    n = len(payload)
    key = random.getrandbits(32).to_bytes(4, "big")
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)


@dataclass
class Totals:
    """Counters shared by every client of one run (one event loop, no locking needed)."""

    received: int = 0
    """Complete data frames received by subscribers (probes included)."""
    reads: int = 0
    """``data_received`` calls on subscriber connections (how well the server batches)."""
    sent: int = 0
    """Publish frames written."""
    acked: int = 0
    """``published`` answers received."""
    subscribers_open: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    """Why subscriber connections ended: close code (or ``eof``) -> count."""
    errors: list[str] = field(default_factory=list)
    """Unexpected frames and failed checks (first few kept)."""
    error_count: int = 0
    checked: int = 0
    """Subscribers whose first message frame decoded as expected."""
    sampling: bool = False
    samples: list[int] = field(default_factory=list)
    """Publish->receive latencies in ns, while ``sampling``."""
    on_progress: Callable[[], None] | None = None
    """Called (once, then cleared) when ``received`` and ``acked`` reach the marks below."""
    wake_received: int = 0
    wake_acked: int = 0

    def error(self, text: str) -> None:
        """Record a problem; keep the first 20 descriptions."""
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(text)

    def closed(self, reason: str) -> None:
        """Count a subscriber connection that ended."""
        self.closes[reason] = self.closes.get(reason, 0) + 1

    def notify(self, received: int, acked: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` as soon as both counters reach the given marks (maybe now)."""
        self.wake_received = received
        self.wake_acked = acked
        self.on_progress = callback
        self.poke()

    def poke(self) -> None:
        """Run the pending callback if its marks are reached. Called after every read."""
        callback = self.on_progress
        if (
            callback is not None
            and self.received >= self.wake_received
            and self.acked >= self.wake_acked
        ):
            self.on_progress = None
            callback()


class WsClient(asyncio.Protocol):
    """A minimal herald.json WebSocket client over a raw asyncio transport."""

    def __init__(self, totals: Totals, host: str, path: str, role: Role, channel: str) -> None:
        loop = asyncio.get_running_loop()
        self.totals = totals
        self.role = role
        self.channel = channel
        self._host = host
        self._path = path
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        """Resolves with the ``subscribed`` (or, for the publisher, ``connected``) answer."""
        self.upgraded = False
        self.closing = False
        self.close_code: str | None = None
        self.received = 0
        """Data frames this connection counted (its share of ``totals.received``)."""
        self._accept = ""
        self._tail = b""
        self._skip = 0
        # Subscribers decode every frame until subscribed, then only headers.
        self._inspect = True
        self._check_left = 1 if role != "publisher" else 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self._accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        request = (
            f"GET {self._path} HTTP/1.1\r\n"
            f"Host: {self._host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
            "\r\n"
        )
        self.transport.write(request.encode())

    def data_received(self, data: bytes) -> None:
        """Handshake first; then frames."""
        totals = self.totals
        if self.upgraded:
            if self.role != "publisher":
                totals.reads += 1
            self._frames(data)
        else:
            self._handshake(data)
        if totals.on_progress is not None:
            totals.poke()

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whoever still waits, and count the loss of a subscriber."""
        reason = self.close_code or ("eof" if exc is None else f"error: {exc}")
        for future in (self.opened, self.ready):
            if not future.done():
                future.set_exception(ConnectionError(f"connection closed ({reason})"))
        if self.role != "publisher" and self.upgraded:
            self.totals.subscribers_open -= 1
            if not self.closing:
                self.totals.closed(reason)

    # Sending

    def send_json(self, *frames: dict[str, Any]) -> None:
        """Encode, mask and write frames in one write."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(client_frame(orjson.dumps(f)) for f in frames))

    def write(self, data: bytes) -> None:
        """Write ready client frame bytes."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """Drop the connection without a close handshake (the benchmark is over)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # Receiving

    def _fail(self, text: str) -> None:
        self.totals.error(text)
        for future in (self.opened, self.ready):
            if not future.done():
                future.set_exception(ConnectionError(text))
        self.close()

    def _handshake(self, data: bytes) -> None:
        buffer = self._tail + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HANDSHAKE:
                self._fail("handshake answer too long")
            self._tail = buffer
            return
        self._tail = b""
        lines = buffer[:end].decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            self._fail(f"handshake answered {lines[0]!r}")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != self._accept:
            self._fail("handshake: wrong Sec-WebSocket-Accept")
            return
        if headers.get("sec-websocket-protocol") != SUBPROTOCOL:
            self._fail(f"handshake: subprotocol {headers.get('sec-websocket-protocol')!r}")
            return
        self.upgraded = True
        if self.role != "publisher":
            self.totals.subscribers_open += 1
        self.opened.set_result(None)
        rest = buffer[end + 4 :]
        if rest:
            self._frames(rest)

    def _frames(self, data: bytes) -> None:
        """Walk frame headers; count complete data frames, inspect only when asked to."""
        n = len(data)
        i = 0
        count = 0
        if self._skip:
            # The body of a data frame whose header came with an earlier chunk.
            if self._skip > n:
                self._skip -= n
                return
            i = self._skip
            self._skip = 0
            count = 1
        if self._tail:
            data = self._tail + data[i:]
            self._tail = b""
            n = len(data)
            i = 0
        inspect = self._inspect
        now = time.time_ns() if self.role == "probe" else 0
        while n - i >= 2:
            b0 = data[i]
            length = data[i + 1]
            if length < 126:
                head = 2
            elif length == 126:
                if n - i < 4:
                    break
                length = (data[i + 2] << 8) | data[i + 3]
                head = 4
            else:
                if n - i < 10:
                    break
                length = int.from_bytes(data[i + 2 : i + 10], "big")
                head = 10
            end = i + head + length
            if b0 == _FIN_TEXT and not inspect:
                if end > n:
                    self._skip = end - n
                    i = n
                    break
                count += 1
                i = end
                continue
            if end > n:
                break
            opcode = b0 & 0x0F
            if b0 & 0x80 == 0 or (opcode >= _OP_CLOSE and length > 125):
                self.totals.error(f"unexpected frame header {data[i : i + head]!r}")
            if opcode in (_OP_TEXT, _OP_BINARY):
                if self._data_frame(data[i + head : end], now):
                    count += 1
                inspect = self._inspect
            else:
                self._control_frame(opcode, data[i + head : end])
            i = end
        if i < n:
            self._tail = data[i:]
        if count:
            self.totals.received += count
            self.received += count

    def _data_frame(self, payload: bytes, now: int) -> bool:
        """Handle a frame while inspecting; True if it counts as a delivery."""
        if self.role == "publisher":
            frame = orjson.loads(payload)
            op = frame.get("op")
            if op == "published":
                self.totals.acked += 1
            elif op == "connected":
                self.ready.set_result(frame)
            else:
                self.totals.error(f"publisher got {payload[:200]!r}")
            return False
        if not self.ready.done():
            frame = orjson.loads(payload)
            op = frame.get("op")
            if op == "subscribed":
                self.ready.set_result(frame)
                self._inspect = self.role == "probe" or self._check_left > 0
            elif op == "error":
                self._fail(f"subscriber got {payload[:200]!r}")
            elif op != "connected":
                self.totals.error(f"unexpected before subscribed: {payload[:200]!r}")
            return False
        if self._check_left:
            self._check_left -= 1
            self._check(payload)
            self._inspect = self.role == "probe"
        if self.role == "probe":
            mark = payload.find(_SAMPLE_MARK)
            if mark >= 0 and self.totals.sampling:
                frame = orjson.loads(payload)
                sent = int(frame["payload"][1:].rstrip("."))
                self.totals.samples.append(now - sent)
        return True

    def _check(self, payload: bytes) -> None:
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.totals.error(f"undecodable frame {payload[:200]!r}")
            return
        body = frame.get("payload")
        if (
            frame.get("op") == "message"
            and frame.get("channel") == self.channel
            and isinstance(body, str)
            and len(body) == PAYLOAD_BYTES
            and isinstance(frame.get("id"), str)
        ):
            self.totals.checked += 1
        else:
            self.totals.error(f"unexpected first message {payload[:200]!r}")

    def _control_frame(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_PING:
            self.write(client_frame(payload, 0xA))
        elif opcode == _OP_CLOSE:
            code = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "1005"
            reason = payload[2:].decode(errors="replace")
            self.close_code = f"{code} {reason}".strip()
            if not self.closing:
                self.totals.error(f"{self.role} closed by the server: {self.close_code}")
            self.write(client_frame(payload[:2], _OP_CLOSE))
            if self.transport is not None:
                self.transport.close()


async def open_client(
    totals: Totals,
    port: int,
    role: Role,
    channel: str,
    key: str,
    within: float = 10.0,
) -> WsClient:
    """Connect, upgrade, authenticate and (unless publishing) subscribe to ``channel``."""
    loop = asyncio.get_running_loop()
    host = "127.0.0.1"
    _, client = await loop.create_connection(
        lambda: WsClient(totals, f"{host}:{port}", "/v1/connect", role, channel), host, port
    )
    try:
        async with asyncio.timeout(within):
            await client.opened
            if role == "publisher":
                client.send_json({"op": "connect", "id": 1, "key": key})
            else:
                client.send_json(
                    {"op": "connect", "id": 1, "key": key},
                    {"op": "subscribe", "id": 2, "channel": channel},
                )
            await client.ready
    except BaseException:
        client.close()
        raise
    return client


@dataclass
class StepCounts:
    """What one publishing window did, read off `Totals` at its edges."""

    seconds: float
    published: int
    delivered: int
    """Data frames received by subscribers inside the window."""
    first_sent: int
    first_received: int


class Feeder(Protocol):
    """Where a `Publisher` sends its messages: WebSocket frames, HTTP batches or Redis."""

    description: str
    """What it sends, for the report (e.g. "websocket publish frames")."""

    def send(self, first: int, count: int, every: int) -> None:
        """Publish messages number ``first`` to ``first + count - 1``, never waiting.

        Message ``n`` goes to channel ``n % len(channels)``; it carries a
        `timestamp_payload` when ``n % every == 0``, a plain payload otherwise.
        Every answer adds one to ``Totals.acked`` and is followed by ``Totals.poke()``.
        """

    def close(self) -> None:
        """Drop the connections (the benchmark is over)."""


class WsFeeder:
    """Sends ``publish`` frames on one `WsClient` (role ``publisher``), which counts answers."""

    description = "websocket publish frames (one connection)"

    def __init__(
        self,
        client: WsClient,
        channels: list[str],
        payload: Callable[[int], bytes] | None = None,
    ) -> None:
        """``payload(n)``, when given, makes message ``n``'s payload (JSON-safe string
        content, stamped or not as it chooses) in place of the 64-byte ones."""
        self.client = client
        self._prefixes = [b'{"op":"publish","channel":"%s","id":' % c.encode() for c in channels]
        self._payload = payload

    def send(self, first: int, count: int, every: int) -> None:
        """Write ``count`` publish frames in one write."""
        prefixes = self._prefixes
        channels = len(prefixes)
        make = self._payload
        frames = []
        for number in range(first, first + count):
            if make is not None:
                payload = make(number)
            elif number % every == 0:
                payload = timestamp_payload(time.time_ns())
            else:
                payload = PLAIN_PAYLOAD
            body = b'%s%d,"payload":"%s"}' % (prefixes[number % channels], number, payload)
            frames.append(client_frame(body))
        self.client.write(b"".join(frames))

    def close(self) -> None:
        """Drop the publisher connection."""
        self.client.close()


class Publisher:
    """Feeds messages through a `Feeder` within the window and backlog bounds.

    Sending is driven by callbacks, not only by a task: whenever a bound is
    what stops it, the publisher asks `Totals` to call it back as soon as
    enough answers and deliveries have come in, which happens in the middle
    of the load generator's pass over its sockets. So the server gets the
    next publishes while the load generator is still reading the previous
    ones, and the two processes work in parallel instead of taking turns.

    ``fanout`` is how many deliveries each message makes (subscribers per
    channel); ``backlog`` bounds the messages published but not yet received
    by all their subscribers, ``window`` those not yet answered.
    """

    def __init__(
        self,
        feeder: Feeder,
        totals: Totals,
        fanout: int,
        *,
        window: int,
        backlog: int,
        batch: int | None = None,
    ) -> None:
        self.feeder = feeder
        self.totals = totals
        self.fanout = fanout
        self.window = window
        self.backlog = backlog
        self._batch = batch or max(1, min(window, backlog) // 8)
        self._loop = asyncio.get_running_loop()
        self._active = False
        self._rate: float | None = None
        self._start = 0.0
        self._first_sent = 0
        self._sample_every = 1

    def _room(self) -> int:
        """How many publishes both bounds allow right now."""
        totals = self.totals
        delivered = totals.received // self.fanout
        return min(totals.acked + self.window, delivered + self.backlog) - totals.sent

    def _due(self) -> int:
        """Publishes the schedule asks for by now (paced steps only)."""
        assert self._rate is not None
        elapsed = self._loop.time() - self._start
        return int(self._rate * elapsed) + 1 - (self.totals.sent - self._first_sent)

    def _send(self, count: int) -> None:
        totals = self.totals
        self.feeder.send(totals.sent, count, self._sample_every)
        totals.sent += count

    def pump(self) -> None:
        """Send what the bounds (and the schedule) allow; if a bound stops us, ask to be called."""
        if not self._active:
            return
        room = self._room()
        wanted = room if self._rate is None else min(room, self._due())
        if wanted > 0:
            self._send(wanted)
            room -= wanted
        if room <= 0 or self._rate is None:
            totals = self.totals
            totals.notify(
                (totals.sent - self.backlog + self._batch) * self.fanout,
                totals.sent - self.window + self._batch,
                self.pump,
            )

    async def wait_until(self, received: int, acked: int, within: float) -> None:
        """Sleep until subscribers have ``received`` frames and ``acked`` publishes are answered.

        Gives up after ``within`` seconds (lost subscribers must not stall the run).
        """
        waiter: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = self._loop.call_later(within, wake)
        try:
            self.totals.notify(received, acked, wake)
            await waiter
        finally:
            timer.cancel()
            self.totals.on_progress = None

    async def run(self, seconds: float, rate: float | None, sample_every: int) -> StepCounts:
        """Publish for ``seconds``: as fast as allowed (``rate`` None) or at ``rate`` per second."""
        totals = self.totals
        loop = self._loop
        self._rate = rate
        self._sample_every = sample_every
        self._first_sent, first_received = totals.sent, totals.received
        self._start = loop.time()
        end = self._start + seconds
        self._active = True
        last_sent, last_progress = totals.sent, self._start
        try:
            self.pump()
            while (now := loop.time()) < end:
                if rate is None:
                    pause = 0.1
                else:
                    # uvloop rounds timers to whole milliseconds and spins on shorter
                    # ones: tick at most every millisecond and send what is due.
                    next_at = self._start + (totals.sent - self._first_sent) / rate
                    pause = max(0.001, next_at - now)
                await asyncio.sleep(min(pause, end - now))
                self.pump()
                if totals.sent != last_sent:
                    last_sent, last_progress = totals.sent, loop.time()
                elif loop.time() - last_progress > 1.0:
                    # Nothing moved for a second (lost subscribers?): keep publishing, slowly.
                    self._send(self._batch)
        finally:
            self._active = False
            totals.on_progress = None
        elapsed = loop.time() - self._start
        return StepCounts(
            seconds=elapsed,
            published=totals.sent - self._first_sent,
            delivered=totals.received - first_received,
            first_sent=self._first_sent,
            first_received=first_received,
        )
