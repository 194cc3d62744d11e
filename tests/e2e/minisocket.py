"""`MiniSocket`: a bare herald.json WebSocket client on asyncio streams.

Cheap enough to hold thousands in one test process, and under the test's
control where a library client is not (it can stay silent to pings).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct

from tests.e2e.conftest import Frame

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Closed(EOFError):
    """The server sent a close frame."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed by the server with {code}")
        self.code = code


class MiniSocket:
    """A herald.json WebSocket client: upgrade, masked text frames out, frames in.

    Only what Herald sends is understood: unfragmented text frames, ping and
    close. It answers pings (the server drops peers that stay silent) unless
    ``answer_pings`` is off, and close frames (the server's graceful shutdown
    waits for the answer). ``pings`` holds when each ping arrived (loop time).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.answer_pings = True
        self.pings: list[float] = []

    @classmethod
    async def open(cls, port: int) -> MiniSocket:
        """Connect to 127.0.0.1:``port`` and upgrade; raises `OSError` if that fails."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET /v1/connect HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: herald.json\r\n\r\n" % (port, key)
        )
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except BaseException:
            writer.close()
            raise
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            writer.close()
            raise ConnectionError(f"upgrade refused: {head[:200]!r}")
        return cls(reader, writer)

    def _write(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        keys = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
        self.writer.write(head + mask + masked)

    def send(self, *frames: Frame) -> None:
        """Queue frames as text messages (no drain: they are small and few)."""
        for frame in frames:
            self._write(0x1, json.dumps(frame).encode())

    def send_raw(self, opcode: int, payload: bytes) -> None:
        """Queue one message of any opcode, as given (for bad frames)."""
        self._write(opcode, payload)

    async def recv(self) -> Frame:
        """The next decoded frame; raises `Closed`, or `EOFError`/`OSError` if the link ends."""
        while True:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length) if length else b""
            opcode = first & 0x0F
            assert first & 0x80, "a fragmented frame: Herald sends whole messages"
            if opcode == 0x1:
                frame: Frame = json.loads(payload)
                return frame
            if opcode == 0x9:
                self.pings.append(asyncio.get_running_loop().time())
                if self.answer_pings:
                    self._write(0xA, payload)
            elif opcode == 0x8:
                self._write(0x8, payload[:2])
                self.close()
                raise Closed(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005)
            elif opcode != 0xA:
                raise AssertionError(f"unexpected opcode {opcode}")

    async def request(self, frame: Frame) -> Frame:
        """Send a frame and return the next frame received."""
        self.send(frame)
        return await self.recv()

    def close(self) -> None:
        """Drop the link (no close handshake: the test is done with it)."""
        self.writer.close()
