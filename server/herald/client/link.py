"""One WebSocket connection of a client (a link): opening it, its requests, reading it.

A `Link` lives from the upgrade to the close. It numbers its requests and
matches answers to them, and tells how it ended: quietly (reconnect) or with a
refusal no reconnect can fix (`FatalError`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from herald.client.errors import ClientError, ConnectionLost, FatalError, RequestError
from herald.client.frames import (
    FATAL_CLOSE_CODES,
    EncodingName,
    Frame,
    TopicKey,
    decode,
    encode,
    handshake_fatal,
    subprotocol,
)

__all__ = ["Link", "SocketOptions"]

logger = logging.getLogger("herald.client")

Answered = Callable[[Frame], None]


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """How a client opens its sockets."""

    url: str
    encoding: EncodingName
    open_timeout: float
    ping_interval: float | None
    max_frame_bytes: int | None
    proxy: str | Literal[True] | None


class Link:
    """One WebSocket connection: the socket, requests awaiting answers, and what it
    asked the server to recover on ``connect``."""

    def __init__(self, ws: ClientConnection, encoding: EncodingName, generation: int) -> None:
        self.ws = ws
        self.encoding = encoding
        self.generation = generation
        """Counts connections; a subscription records the one it was subscribed on."""
        self.ready = False
        """Connected and past the ``connect`` barrier: requests may go out."""
        self.closed = False
        self.close_code: int | None = None
        self.fatal: FatalError | None = None
        self.last_error: Frame | None = None
        """The last ``error`` frame without an ``id`` (it explains a close that follows)."""
        self.resumed_from: dict[TopicKey, str] = {}
        """The ``since`` this connection's ``connect`` named for each topic (``resume``)."""
        self.unrecovered: dict[TopicKey, Frame] = {}
        """Topics the server subscribed on ``connect`` without recovering them (a server
        that predates ``resume``): they are subscribed again with ``since``."""
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Frame], Answered | None]] = {}

    @classmethod
    async def open(cls, options: SocketOptions, generation: int) -> Link:
        """Open a socket; `FatalError` when the upgrade is refused for good."""
        protocol = subprotocol(options.encoding)
        # websockets < 15 knows no proxies: pass the option only when it is not the default.
        extra: dict[str, Any] = {} if options.proxy is True else {"proxy": options.proxy}
        try:
            ws = await connect(
                options.url,
                subprotocols=[Subprotocol(protocol)],
                open_timeout=options.open_timeout,
                ping_interval=options.ping_interval,
                ping_timeout=options.ping_interval,
                close_timeout=options.open_timeout,
                max_size=options.max_frame_bytes,
                **extra,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if handshake_fatal(status):
                raise FatalError("the upgrade was refused", status=status) from None
            raise
        except InvalidURI as exc:
            raise FatalError(str(exc)) from None
        # No subprotocol in the answer means JSON (the server's default).
        if (ws.subprotocol or "herald.json") != protocol:
            await ws.close()
            raise FatalError(f"the server does not speak {protocol}")
        return cls(ws, options.encoding, generation)

    async def send(self, frame: Frame) -> None:
        """Send one frame; `ConnectionLost` if the socket is gone."""
        if self.closed:
            raise ConnectionLost("the connection is closed")
        try:
            await self.ws.send(encode(frame, self.encoding))
        except ConnectionClosed as exc:
            raise ConnectionLost(str(exc)) from None

    async def request(self, frame: Frame, on_answer: Answered | None = None) -> Frame:
        """Send ``frame`` with a fresh id; its answer, or `RequestError` for an ``error``.

        ``on_answer`` runs in the reader, before the frames that follow the answer
        are read (a subscription must be live before its replay arrives).
        """
        request_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, on_answer)
        try:
            await self.send({**frame, "id": request_id})
            return await future
        finally:
            self._pending.pop(request_id, None)

    def answer(self, frame: Frame) -> bool:
        """Complete the request this frame answers; False if it answers none."""
        request_id = frame.get("id")
        entry = self._pending.get(request_id) if isinstance(request_id, int) else None
        if entry is None:
            return False
        future, on_answer = entry
        if future.done():
            return True
        if frame.get("op") == "error":
            code, detail = str(frame.get("code", "error")), str(frame.get("detail", ""))
            future.set_exception(RequestError(code, detail, frame.get("path")))
            return True
        if on_answer is not None:
            on_answer(frame)
        future.set_result(frame)
        return True

    def lost(self, error: ClientError) -> None:
        """Mark the link over and fail every request still waiting."""
        self.closed = True
        self.ready = False
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def read(self, dispatch: Callable[[Link, Frame], Awaitable[None]]) -> None:
        """Hand every frame to ``dispatch`` until the socket closes; raises `FatalError`
        if it closed with 4001 or 4003, returns otherwise."""
        try:
            while True:
                data = await self.ws.recv()
                try:
                    frame = decode(data)
                except ValueError as exc:
                    logger.warning("ignoring a frame: %s", exc)
                    continue
                await dispatch(self, frame)
        except ConnectionClosed as exc:
            received = exc.rcvd
            self.close_code = received.code if received is not None else 1006
            if self.close_code in FATAL_CLOSE_CODES:
                said = self.last_error or {}
                reason = received.reason if received is not None else ""
                self.fatal = FatalError(
                    str(said.get("detail") or reason or "refused"),
                    close_code=self.close_code,
                    code=said.get("code"),
                )
                self.lost(self.fatal)
                raise self.fatal from None
            self.lost(ConnectionLost(f"the server closed the connection ({self.close_code})"))
