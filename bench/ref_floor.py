"""Reference server: the least a Python server can do per delivery, fed by Redis pub/sub.

Not a server anyone would ship: it has no validation worth the name, no
backpressure, no history and no auth. It is here to measure the ceiling under
the other servers, in the same run and with the same load generator: what
one core reaches when each delivery costs nothing but a dictionary lookup and
one ``transport.write`` of bytes that already exist.

- asyncio protocols on uvloop, no framework: the HTTP upgrade is parsed by
  hand (request line and headers, nothing else), client frames by a
  ten-line parser that handles what the load generator sends (small masked
  text frames, ping, close);
- one raw Redis pub/sub connection read with ``hiredis``, one ``SUBSCRIBE``
  per channel while it has local subscribers;
- every Redis message (already a complete ``message`` frame's text) gets its
  two- or four-byte WebSocket header once and is written to each subscriber.

It speaks the same subset of ``herald.json`` as the other references
(``connect``, ``subscribe``, ``ping``), answers ``subscribed`` once Redis has
confirmed the ``SUBSCRIBE``, and ``GET /healthz`` with 200.

Usage: python bench/ref_floor.py --port P --redis redis://127.0.0.1:R/0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import signal
import struct
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import uvloop

HOST = "127.0.0.1"
SUBPROTOCOL = "herald.json"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 8192


def text_frame(payload: bytes) -> bytes:
    """One unmasked server text frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the four-byte ``key``, as one big integer (no per-byte loop)."""
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


class Hub:
    """Channel -> subscribers' transports, mirrored onto one Redis pub/sub connection."""

    def __init__(self) -> None:
        self.channels: dict[bytes, set[asyncio.Transport]] = {}
        self.waiting: dict[bytes, list[asyncio.Future[None]]] = {}
        self.redis: RedisLink | None = None

    async def subscribe(self, channel: bytes, transport: asyncio.Transport) -> None:
        """Add a subscriber; the first one of a channel SUBSCRIBEs and waits for Redis."""
        members = self.channels.setdefault(channel, set())
        members.add(transport)
        if len(members) == 1:
            assert self.redis is not None
            self.waiting[channel] = []
            self.redis.send(b"SUBSCRIBE", channel)
        if channel in self.waiting:
            future = asyncio.get_running_loop().create_future()
            self.waiting[channel].append(future)
            await future

    def leave(self, transport: asyncio.Transport, channels: set[bytes]) -> None:
        """Drop a closed connection; UNSUBSCRIBE channels nobody here wants anymore."""
        for channel in channels:
            members = self.channels.get(channel)
            if members is not None:
                members.discard(transport)
                if not members:
                    del self.channels[channel]
                    if self.redis is not None:
                        self.redis.send(b"UNSUBSCRIBE", channel)

    def on_reply(self, reply: Any) -> None:
        """One pub/sub reply: a message to fan out, or a confirmation."""
        kind = reply[0]
        if kind == b"message":
            members = self.channels.get(reply[1])
            if members:
                frame = text_frame(reply[2])
                for transport in members:
                    transport.write(frame)
        elif kind == b"subscribe":
            for future in self.waiting.pop(reply[1], []):
                if not future.done():
                    future.set_result(None)


class RedisLink(asyncio.Protocol):
    """The pub/sub connection: commands out, replies parsed in bulk by hiredis."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, *command: bytes) -> None:
        """Write one command."""
        assert self.transport is not None
        self.transport.write(hiredis.pack_command(command))  # type: ignore[arg-type,unused-ignore]

    def data_received(self, data: bytes) -> None:
        """Hand every complete reply to the hub."""
        self.reader.feed(data)
        on_reply = self.hub.on_reply
        while (reply := self.reader.gets()) is not False:
            on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """The server cannot work without Redis: stop."""
        if not self.lost.done():
            self.lost.set_result(None)


class Client(asyncio.Protocol):
    """One client connection: the HTTP upgrade, then WebSocket frames."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.joined: set[bytes] = set()
        self.requests: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        """Buffer, then handle the upgrade request or every complete frame."""
        self.buffer += data
        if not self.upgraded:
            self._upgrade()
        if self.upgraded:
            self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        """Leave every channel."""
        if self.transport is not None:
            self.hub.leave(self.transport, self.joined)

    def _upgrade(self) -> None:
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEAD:
                self.transport.close()
            return
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) == 3 and parts[1] == b"/healthz":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            self.transport.close()
            return
        key = headers.get(b"sec-websocket-key")
        if key is None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        offered = [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",")]
        chosen = b"Sec-WebSocket-Protocol: herald.json\r\n" if b"herald.json" in offered else b""
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + chosen + b"\r\n"
        )
        self.upgraded = True

    def _frames(self) -> None:
        assert self.transport is not None
        while len(self.buffer) >= 6:
            opcode, n = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            at = 2
            if n == 126:
                (n,) = struct.unpack_from("!H", self.buffer, 2)
                at = 4
            elif n == 127:
                (n,) = struct.unpack_from("!Q", self.buffer, 2)
                at = 10
            if len(self.buffer) < at + 4 + n:
                return
            key = self.buffer[at : at + 4]
            payload = unmask(self.buffer[at + 4 : at + 4 + n], key)
            self.buffer = self.buffer[at + 4 + n :]
            if opcode == 0x8:  # close: answer it, then drop the connection
                self.transport.write(b"\x88\x00")
                self.transport.close()
                return
            if opcode == 0x9:  # ping
                self.transport.write(bytes((0x8A, len(payload))) + payload)
            elif opcode == 0x1:
                task = asyncio.ensure_future(self._request(payload))
                self.requests.add(task)  # held until done: the loop keeps only weak ones
                task.add_done_callback(self.requests.discard)

    async def _request(self, raw: bytes) -> None:
        assert self.transport is not None
        answer: dict[str, Any]
        try:
            request = json.loads(raw)
            op, request_id = request.get("op"), request.get("id")
        except (ValueError, AttributeError):
            answer = {"op": "error", "code": "bad_request", "detail": "not a JSON object"}
        else:
            if op == "connect":
                answer = {"op": "connected", "id": request_id}
            elif op == "ping":
                answer = {"op": "pong", "id": request_id}
            elif op == "subscribe" and isinstance(request.get("channel"), str):
                channel = request["channel"].encode()
                self.joined.add(channel)
                await self.hub.subscribe(channel, self.transport)
                answer = {"op": "subscribed", "id": request_id, "channel": request["channel"]}
            else:
                answer = {"op": "error", "id": request_id, "code": "bad_request"}
        if not self.transport.is_closing():
            self.transport.write(text_frame(json.dumps(answer).encode()))


async def main(port: int, redis_url: str) -> int:
    """Serve until SIGTERM/SIGINT (0) or until the Redis connection drops (1)."""
    loop = asyncio.get_running_loop()
    hub = Hub()
    url = urlsplit(redis_url)
    _, link = await loop.create_connection(
        lambda: RedisLink(hub), url.hostname or HOST, url.port or 6379
    )
    hub.redis = link
    server = await loop.create_server(lambda: Client(hub), HOST, port, backlog=4096)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    waiting = asyncio.ensure_future(stopped.wait())
    either: list[asyncio.Future[Any]] = [waiting, link.lost]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    server.close()
    if link.transport is not None:
        link.transport.close()
    return 0 if stopped.is_set() else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reference server: the per-delivery floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    args = parser.parse_args()
    raise SystemExit(uvloop.run(main(args.port, args.redis)))
