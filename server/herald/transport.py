"""The only module that touches sockets: WebSocket handshake, reading, batched writing.

`Connection` is an asyncio protocol that uvicorn hands every upgrade request
to (its ``ws`` setting), so HTTP and WebSocket share one port. It drives the
`websockets` sans-I/O `ServerProtocol` for the handshake, incoming frames and
control frames, but writes fan-out frames itself: the hub gives it ready
frame bytes and it coalesces them into one ``writelines`` per loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from functools import partial
from typing import Any, cast

from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Origin, Subprotocol

from herald.auth import Principal
from herald.errors import CloseCode, HeraldError, TooManyRequests, Unauthorized, Unavailable
from herald.metrics import CONNECTIONS, DROPPED, ENGINE_ERRORS, SLOW_CONSUMERS
from herald.models import Device, Message
from herald.node import Node
from herald.protocol import (
    MSGPACK,
    SUBPROTOCOLS,
    Connect,
    ConnectionState,
    Encoding,
    Ping,
    Publish,
    Reply,
    Subscribe,
    Unsubscribe,
    encode,
    error_frame,
    ws_frame,
)

__all__ = ["CONNECT_PATH", "Connection", "keepalive"]

# What handshake requests keep once answered (see `Connection._on_handshake`); never
# written to, so one is enough for every connection.
_NO_HEADERS = Headers()

logger = logging.getLogger("herald.transport")
# The websockets protocol logs every connection's open and close at INFO: at tens
# of thousands of sockets that is noise, so its logger starts at WARNING.
_protocol_logger = logging.getLogger("herald.transport.websocket")
_protocol_logger.setLevel(logging.WARNING)

CONNECT_PATH = "/v1/connect"
_CLOSE_GRACE = 2.0  # seconds to wait for the peer's close frame before dropping the TCP link
_INBOX_HIGH = 64  # frames queued before we stop reading from the socket
_INBOX_LOW = 16
_MAX_PUBLISHING = 256  # publishes one connection may have in flight
# The keepalive pings one slice of the connections every tick. Pinging 10,000 at once
# held a worker's loop for 217-303 ms (every message waited); slices of a tenth of a
# second keep each stop near what a tick's share of them costs.
_PING_TICK = 0.1
_ping_turns = itertools.count()
_ids = itertools.count(1)


def _select_subprotocol(_: ServerProtocol, offered: Any) -> Subprotocol | None:
    for name in SUBPROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    return None  # no (known) subprotocol: JSON, as a plain browser WebSocket expects


class Connection(asyncio.Protocol):
    """One WebSocket client. Created by uvicorn with its config and shared state."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.node: Node = app_state["node"]
        settings = self.node.settings
        self._limit = settings.outbox_limit_bytes
        self._server_connections: set[Any] = server_state.connections
        extensions = [ServerPerMessageDeflateFactory()] if settings.websocket_compression else None
        # None in the list lets in clients that send no Origin: they are not browsers,
        # and the setting exists to stop other sites' pages from using a user's cookies.
        origins = [*map(Origin, settings.origins), None] if settings.origins else None
        self.ws = ServerProtocol(
            origins=origins,
            subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
            select_subprotocol=_select_subprotocol,
            extensions=extensions,
            max_size=settings.max_frame_bytes,
            logger=_protocol_logger,
        )
        self.loop = _loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.encoding = Encoding.JSON
        self.state = ConnectionState(self.encoding, max_bad_frames=settings.max_bad_frames)
        self.principal: Principal | None = None
        self.device: Device | None = None
        self.client_id = ""
        self.alive = True
        self.ping_turn = next(_ping_turns)
        """Which slice of the keepalive's interval this connection is pinged in."""
        self.open = False
        self._closing = False
        self._out: list[bytes] = []
        self._queued = False
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._inbox: deque[bytes | str] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._publishing: set[asyncio.Task[Message]] = set()
        self._address: str | None = None  # counted in the node's connections per address

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with the server so a graceful shutdown reaches us."""
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)
        self._server_connections.add(self)
        # Still the HTTP protocol that took the upgrade request: uvicorn breaks its cycle
        # with its parser in connection_lost, which an upgraded connection never reaches.
        # Left alone, each connection leaves some 23 objects to the cyclic collector, and
        # the sweep that finds 10,000 connections' worth (bench/run.py S2) stops the
        # worker for 260-390 ms. Once the handshake is handed over, nothing reads it.
        upgraded_from = transport.get_protocol()
        if upgraded_from is not self and hasattr(upgraded_from, "parser"):
            upgraded_from.parser = None

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection everywhere."""
        self._server_connections.discard(self)
        self._closing = True
        self._out.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self._worker is not None:
            self._worker.cancel()
        if self._address is not None:
            self.node.release_address(self._address)
            self._address = None
        if self.open:
            self.open = False
            CONNECTIONS.dec()
            self.node.clients.discard(self)
            self.loop.create_task(self.node.disconnect(self))

    def data_received(self, data: bytes) -> None:
        """Feed the sans-I/O protocol and act on the events it yields."""
        self.ws.receive_data(data)
        self.alive = True
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Request):
                self._on_handshake(event)
        self._write_protocol_data()

    def eof_received(self) -> bool | None:
        """The peer half-closed: let the protocol answer, then close."""
        self.ws.receive_eof()
        self._write_protocol_data()
        return None

    def shutdown(self) -> None:
        """Called by uvicorn on SIGTERM: tell the client to reconnect elsewhere."""
        if self.open:
            self.close(CloseCode.SERVICE_RESTART, "server restarting")
        elif self.transport is not None:
            self.transport.close()

    # Handshake and incoming frames

    def _on_handshake(self, request: Request) -> None:
        if request.path.partition("?")[0] != CONNECT_PATH:
            response = self.ws.reject(404, "Not found\n")
        else:
            response = self.ws.accept(request)
        self.ws.send_response(response)
        # websockets' parser keeps the handshake request in a generator's local for as long
        # as the connection lives; its headers (some 20 objects the garbage collector walks
        # again and again) are not needed once answered.
        request.headers = _NO_HEADERS
        if response.status_code != 101:
            return
        self.encoding = Encoding(self.ws.subprotocol or Encoding.JSON.value)
        self.state.encoding = self.encoding
        self.client_id = f"{self.node.name}/{next(_ids)}"
        self.open = True
        CONNECTIONS.inc()
        self.node.clients.add(self)
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"
        if not self.node.hold_address(address):
            # Refused after the upgrade: a close code is what a WebSocket client sees.
            # The handshake response goes out first, ahead of the frames.
            self._write_protocol_data()
            limit = self.node.settings.max_connections_per_ip
            error = TooManyRequests(
                f"at most {limit} connections per address", code="too_many_connections"
            )
            self.send(error_frame(error))
            self.close(CloseCode.TOO_MANY_CONNECTIONS, error.detail)
            return
        self._address = address
        self._timer = self.loop.call_later(
            self.node.settings.connect_timeout, self._connect_timeout
        )

    def _connect_timeout(self) -> None:
        if not self.state.authenticated:
            self.send(error_frame(Unauthorized("no connect frame in time")))
            self.close(CloseCode.UNAUTHORIZED, "no connect frame in time")

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        # The parser hands out bytes; the wider declared type is for callers that send.
        chunk = cast(bytes, frame.data)
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._fragment_text = opcode is Opcode.TEXT
            if not frame.fin:
                self._fragments = [chunk]
                return
            data = chunk
        elif opcode is Opcode.CONT:
            self._fragments.append(chunk)
            if not frame.fin:
                return
            data, self._fragments = b"".join(self._fragments), []
        else:
            return  # ping, pong and close are answered by the protocol itself
        if self._closing:
            return
        if self._fragment_text:
            # The sans-I/O parser does not check UTF-8 (its asyncio layer does).
            try:
                text: bytes | str = data.decode()
            except UnicodeDecodeError:
                self.close(CloseCode.INVALID_DATA, "text frame is not valid UTF-8")
                return
        else:
            text = data
        self._inbox.append(text)
        if self._worker is None:
            self._worker = self.loop.create_task(self._drain_inbox())
        if len(self._inbox) >= _INBOX_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    async def _drain_inbox(self) -> None:
        try:
            while self._inbox and not self._closing:
                await self._handle(self._inbox.popleft())
                if self._paused and len(self._inbox) <= _INBOX_LOW and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
        finally:
            self._worker = None

    async def _handle(self, data: bytes | str) -> None:
        state = self.state
        try:
            request = state.receive(data)
            if isinstance(request, Connect):
                await self._connect(request)
            elif isinstance(request, Subscribe):
                assert self.principal is not None
                await self.node.subscribe(self, self.principal, request)
            elif isinstance(request, Unsubscribe):
                assert self.principal is not None
                await self.node.unsubscribe(self, self.principal, request)
            elif isinstance(request, Publish):
                await self._publish(request)
            elif isinstance(request, Ping):
                frame: dict[str, Any] = {"op": "pong"}
                if request.id is not None:
                    frame["id"] = request.id
                self.send(frame)
            elif isinstance(request, Reply):
                await self.node.commands.reply(self, request)
        except HeraldError as exc:
            if isinstance(exc, Unavailable):
                ENGINE_ERRORS.inc()
            self.send(error_frame(exc, state.request_id))
            code = state.close_code_for(exc)
            if code is not None:
                self.close(code, exc.detail)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("request failed on %s", self.client_id)
            self.send(
                {
                    "op": "error",
                    "id": state.request_id,
                    "code": "internal_error",
                    "detail": "internal error",
                }
            )

    async def _publish(self, request: Publish) -> None:
        """Start a publish and go on reading: its answer is sent when it completes.

        Publishes are started in the order they arrive and the engine keeps
        that order, so a client may pipeline them; at most ``_MAX_PUBLISHING``
        are in flight per connection.
        """
        assert self.principal is not None
        while len(self._publishing) >= _MAX_PUBLISHING:
            await asyncio.wait(self._publishing, return_when=asyncio.FIRST_COMPLETED)
        task = self.loop.create_task(
            self.node.publisher.publish(
                self.principal,
                request.channel,
                payload=request.payload,
                room=request.room,
                metadata=request.metadata,
                audience=request.audience,
            )
        )
        self._publishing.add(task)
        task.add_done_callback(partial(self._published, request.id))

    def _published(self, request_id: object, task: asyncio.Task[Message]) -> None:
        self._publishing.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.send({"op": "published", "id": request_id, "message_id": task.result().id})
        elif isinstance(error, HeraldError):
            if isinstance(error, Unavailable):
                ENGINE_ERRORS.inc()
            self.send(error_frame(error, request_id))
        else:
            logger.error("publish failed on %s", self.client_id, exc_info=error)
            self.send(
                {
                    "op": "error",
                    "id": request_id,
                    "code": "internal_error",
                    "detail": "internal error",
                }
            )

    async def _connect(self, request: Connect) -> None:
        credential = request.key or request.token or request.connection_key
        assert credential is not None  # the protocol asks for exactly one
        principal = await self.node.authenticate(credential)
        if principal.is_device != (request.connection_key is not None):
            # Each credential in its own field: a device key is no app key, and back.
            raise Unauthorized("invalid credentials")
        if principal.is_device:
            await self.node.devices.connect(self, principal)
        self.principal = principal
        self.state.authenticated = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        frame: dict[str, Any] = {
            "op": "connected",
            "client_id": self.client_id,
            "ping_interval": self.node.settings.ping_interval,
            "server": self.node.name,
        }
        if request.id is not None:
            frame["id"] = request.id
        if self.device is not None:
            frame["device_id"] = self.device.id
        self.send(frame)
        if principal.is_user or principal.is_device:
            await self.node.resume_subscriptions(self, principal, request.resume)

    # Outgoing

    def send(self, frame: dict[str, Any]) -> None:
        """Encode one server frame for this connection and queue it."""
        self.push(ws_frame(encode(frame, self.encoding), binary=self.encoding is MSGPACK))

    def push(self, frame: bytes) -> None:
        """Queue ready frame bytes; the hub flushes once per loop iteration. Never awaits."""
        if self._closing:
            return
        self._out.append(frame)
        if not self._queued:
            self._queued = True
            self.node.hub.schedule_flush(self)

    def flush(self) -> None:
        """Write everything queued in one call, or close the connection as slow."""
        self._queued = False
        if not self._out or self.transport is None or self._closing:
            return
        out, self._out = self._out, []
        transport = self.transport
        if transport.is_closing():
            return  # the peer is gone; writing would raise
        if transport.get_write_buffer_size() > self._limit:
            # It is not reading: what we wrote before is still here, unsent. Drop the
            # new frames rather than let the backlog grow; it can reconnect with
            # `since` and recover what it missed from history.
            logger.info(
                "closing %s: slow consumer (%d bytes unsent)",
                self.client_id,
                transport.get_write_buffer_size(),
            )
            SLOW_CONSUMERS.inc()
            DROPPED.inc(len(out))
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        transport.writelines(out)

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Flush what is queued, send a close frame, and drop the link if the peer lingers."""
        if self._closing or self.transport is None:
            return
        if code is not CloseCode.SLOW_CONSUMER:
            self.flush()
        self._closing = True
        self._out.clear()
        with contextlib.suppress(Exception):  # the protocol may already be closing
            self.ws.send_close(code, reason.encode()[:120].decode(errors="ignore"))
        self._write_protocol_data()
        self.loop.call_later(_CLOSE_GRACE, self._abort)

    def ping(self) -> None:
        """Send a transport ping; the keepalive drops peers that stay silent."""
        if self._closing:
            return
        self.alive = False
        with contextlib.suppress(Exception):
            self.ws.send_ping(b"")
        self._write_protocol_data()

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _write_protocol_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif not transport.is_closing():
                # End of stream: the close handshake is over (or the handshake failed, or
                # we failed the connection, e.g. 1009). Half-close and keep reading until
                # the peer closes (or the grace timer aborts): closing with its data still
                # unread would send a RST, and the peer would lose our close frame.
                try:
                    transport.write_eof()
                except Exception:  # cannot half-close (TLS) or already gone: just close
                    transport.close()
                else:
                    self.loop.call_later(_CLOSE_GRACE, self._abort)
        if self.ws.close_expected() and not self._closing:
            self._closing = True
            self.loop.call_later(_CLOSE_GRACE, self._abort)


async def keepalive(node: Node) -> None:
    """Ping every open connection each ``ping_interval``; drop those silent since the last.

    The connections are pinged a slice at a time, one slice a tick (about
    `_PING_TICK`): each once an interval, always in the same slice, and the
    loop never stops for all of them at once. A connection opened during an
    interval joins the slicing at the next one.
    """
    interval = node.settings.ping_interval
    slices = max(1, round(interval / _PING_TICK))
    while True:
        # Sorted into slices once an interval rather than filtered every tick.
        turns: list[list[Connection]] = [[] for _ in range(slices)]
        for client in node.clients:
            turns[client.ping_turn % slices].append(client)
        for turn in turns:
            await asyncio.sleep(interval / slices)
            for client in turn:
                if client not in node.clients:
                    continue  # closed meanwhile
                if not client.alive:
                    client._abort()
                else:
                    client.ping()
