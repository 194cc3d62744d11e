"""Redis from the load generator: pipelined PUBLISH (the references' feed) and set-up calls.

The reference servers forward every message of Redis channel NAME, unchanged,
as a text frame to each of their subscribers of NAME, so `RedisFeeder`
publishes complete ``message`` frames, shaped like the ones Herald sends (the
same fields and lengths), so every server pushes the same bytes per delivery.
Commands are prebuilt RESP bytes written without waiting; of the replies
(one integer each) it only counts the line ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast
from urllib.parse import urlsplit

from bench.loadgen import PLAIN_PAYLOAD, Totals, timestamp_payload

__all__ = ["RedisFeeder", "call", "message_frame_parts", "resp_command"]

_FRAME_HEAD = b'{"op":"message","channel":"%s","room":"","id":"1700000000000-0","payload":"'
_FRAME_TAIL = (
    b'","author":{"type":"key","id":"bootstrap"},"created_at":"2025-01-01T00:00:00.000000Z"}'
)


def message_frame_parts(channel: str) -> tuple[bytes, bytes]:
    """What goes before and after the payload in the frame text published for ``channel``."""
    return _FRAME_HEAD % channel.encode(), _FRAME_TAIL


def resp_command(*args: bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


async def _reply(reader: asyncio.StreamReader) -> object:
    line = await reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        return None if length < 0 else (await reader.readexactly(length + 2))[:-2]
    if kind == b"*":
        length = int(rest)
        return None if length < 0 else [await _reply(reader) for _ in range(length)]
    raise RuntimeError(f"redis: unexpected reply {line[:100]!r}")


async def call(url: str, *args: bytes) -> object:
    """Run one command on a fresh connection and return its parsed reply."""
    host, port = _address(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(resp_command(*args))
        return await _reply(reader)
    finally:
        writer.close()


class RedisFeeder(asyncio.Protocol):
    """Feeds a `Publisher` with pipelined ``PUBLISH channel <frame>`` on one connection."""

    description = "Redis PUBLISH of the complete frame text (pipelined, one connection)"

    def __init__(self, totals: Totals, channels: list[str]) -> None:
        self.totals = totals
        self.transport: asyncio.Transport | None = None
        self.unheard = 0
        """Replies of 0 (nobody subscribed to that Redis channel): approximate."""
        self._heads: list[bytes] = []
        self._plain: list[bytes] = []
        for channel in channels:
            head, tail = message_frame_parts(channel)
            frame_length = len(head) + len(PLAIN_PAYLOAD) + len(tail)
            name = channel.encode()
            command_head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s" % (
                len(name),
                name,
                frame_length,
                head,
            )
            self._heads.append(command_head)
            self._plain.append(command_head + PLAIN_PAYLOAD + tail + b"\r\n")
        self._tail = _FRAME_TAIL + b"\r\n"

    @classmethod
    async def open(cls, url: str, totals: Totals, channels: list[str]) -> RedisFeeder:
        """Connect to the Redis at ``url``."""
        host, port = _address(url)
        loop = asyncio.get_running_loop()
        _, feeder = await loop.create_connection(lambda: cls(totals, channels), host, port)
        return feeder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """A lost feed is an error of the run."""
        if self.transport is not None and not self.transport.is_closing():
            self.totals.error(f"redis feed lost: {exc or 'eof'}")

    def send(self, first: int, count: int, every: int) -> None:
        """Write ``count`` PUBLISH commands in one write."""
        if self.transport is None or self.transport.is_closing():
            return
        heads, plain, tail = self._heads, self._plain, self._tail
        channels = len(heads)
        commands = []
        for number in range(first, first + count):
            index = number % channels
            if number % every == 0:
                commands.append(heads[index] + timestamp_payload(time.time_ns()) + tail)
            else:
                commands.append(plain[index])
        self.transport.write(b"".join(commands))

    def data_received(self, data: bytes) -> None:
        """Each reply is one ``:<receivers>`` line: count them."""
        totals = self.totals
        totals.acked += data.count(b"\n")
        if b"-" in data:
            totals.error(f"redis answered {data[:200]!r}")
        if b":0\r" in data:
            self.unheard += data.count(b":0\r")
        totals.poke()

    def close(self) -> None:
        """Drop the connection."""
        if self.transport is not None:
            self.transport.close()
