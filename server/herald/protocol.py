"""The WebSocket protocol without I/O: frames in, requests out, bytes to send.

`ConnectionState` holds what one connection has said so far; the transport
feeds it decoded WebSocket messages and acts on what it returns. Nothing
here touches a socket, so all of it is tested with plain values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import orjson

from herald.codec import packb
from herald.errors import CloseCode, HeraldError, ProtocolError, Unauthorized
from herald.models import Message, Topic, check_name, parse_offset

__all__ = [
    "JSON",
    "MSGPACK",
    "SUBPROTOCOLS",
    "Connect",
    "ConnectionState",
    "Encoding",
    "Ping",
    "Publish",
    "Reply",
    "Request",
    "ResumePoint",
    "Subscribe",
    "Unsubscribe",
    "decode",
    "encode",
    "error_frame",
    "message_frame",
    "ws_frame",
]


class Encoding(Enum):
    """How frames are serialised on one connection, chosen by subprotocol."""

    JSON = "herald.json"
    MSGPACK = "herald.msgpack"

    # Enum's own __hash__ is Python code (it hashes the name); members are singletons
    # compared by identity, so the identity hash is as good and costs no call. The hub
    # keys each message's frames by encoding.
    __hash__ = object.__hash__


# Read through the class, a member is an attribute lookup in Python code on 3.11
# (about 90 ns): the per-message paths use these names instead.
JSON = Encoding.JSON
MSGPACK = Encoding.MSGPACK

SUBPROTOCOLS = (JSON.value, MSGPACK.value)
"""Subprotocols offered at the handshake, in order of preference."""

_MAX_ID_LENGTH = 64
_MAX_RESUME = 1000  # resume points in one connect (a connection holds at most 1000 topics)


def decode(data: bytes | str, encoding: Encoding) -> dict[str, Any]:
    """Parse one WebSocket message into a frame object, or raise `ProtocolError`.

    JSON connections must send text messages, msgpack connections binary ones.
    """
    if encoding is Encoding.JSON:
        if not isinstance(data, str):
            raise ProtocolError("herald.json expects text frames")
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"JSON parse error: {exc}") from None
    else:
        if isinstance(data, str):
            raise ProtocolError("herald.msgpack expects binary frames")
        try:
            frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises a zoo of types: all mean "does not parse"
            raise ProtocolError(f"MessagePack parse error: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("a frame must be an object")
    return frame


def encode(frame: dict[str, Any], encoding: Encoding) -> bytes:
    """Serialise a server frame for one encoding."""
    if encoding is JSON:
        return orjson.dumps(frame)
    packed: bytes = packb(frame)
    return packed


# The two-byte headers of the frames short enough to carry their length in the second byte.
_TEXT_HEADS = [bytes((0x81, n)) for n in range(126)]
_BINARY_HEADS = [bytes((0x82, n)) for n in range(126)]


def ws_frame(payload: bytes, *, binary: bool) -> bytes:
    """One unmasked, unfragmented WebSocket data frame.

    Server frames carry no mask, so these bytes are the same for every
    subscriber: the fan-out builds them once and writes them many times.
    """
    n = len(payload)
    if n < 126:
        return (_BINARY_HEADS if binary else _TEXT_HEADS)[n] + payload
    head = 0x82 if binary else 0x81
    if n < 65536:
        return struct.pack("!BBH", head, 126, n) + payload
    return struct.pack("!BBQ", head, 127, n) + payload


def message_frame(message: Message) -> dict[str, Any]:
    """The ``message`` frame a subscriber receives."""
    frame: dict[str, Any] = {
        "op": "message",
        "channel": message.channel,
        "room": message.room,
        "id": message.id,
        "payload": message.payload,
        "author": message.author,
        "created_at": message.created_at,
    }
    if message.metadata is not None:
        frame["metadata"] = message.metadata
    return frame


def error_frame(error: HeraldError, request_id: object = None) -> dict[str, Any]:
    """The ``error`` frame for a failed request."""
    frame: dict[str, Any] = {"op": "error", "code": error.code, "detail": error.detail}
    if request_id is not None:
        frame["id"] = request_id
    if error.path is not None:
        frame["path"] = error.path
    return frame


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a client left a topic it persistently subscribes to: the subscription
    resumed at connect recovers after ``since``."""

    channel: str
    room: str | None
    since: str
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Connect:
    """``connect``: the first frame, with exactly one credential, and where to resume
    persistent subscriptions from (``resume``)."""

    id: object
    key: str | None
    token: str | None
    connection_key: str | None
    client: str | None
    resume: tuple[ResumePoint, ...] = ()


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscribe`` to one channel (and room), optionally recovering after ``since``."""

    id: object
    channel: str
    room: str | None
    since: str | None
    subscriber_key: str | None
    persist: bool
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``unsubscribe`` from one channel (and room)."""

    id: object
    channel: str
    room: str | None
    persist: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    """``publish`` a payload from the socket."""

    id: object
    channel: str
    room: str | None
    payload: Any
    metadata: dict[str, Any] | None
    audience: Any = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A device's ``reply`` to a command."""

    command_id: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: answered with ``pong``."""

    id: object


Request = Connect | Subscribe | Unsubscribe | Publish | Reply | Ping


def _request_id(frame: dict[str, Any], required: bool = True) -> object:
    value = frame.get("id")
    if value is None:
        if required:
            raise ProtocolError("id is required", path="id")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError("id must be a string or an integer", path="id")
    if isinstance(value, str) and len(value) > _MAX_ID_LENGTH:
        raise ProtocolError(f"id is at most {_MAX_ID_LENGTH} characters", path="id")
    if isinstance(value, int) and not -(2**53) < value < 2**53:
        raise ProtocolError("id must fit in 53 bits", path="id")
    return value


def _str(frame: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = frame.get(name)
    if value is None:
        if required:
            raise ProtocolError(f"{name} is required", path=name)
        return None
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ProtocolError(f"{name} must be a non-empty string", path=name)
    return value


def _channel(frame: dict[str, Any]) -> tuple[str, str | None]:
    channel = frame.get("channel")
    if channel is None:
        raise ProtocolError("channel is required", path="channel")
    try:
        check_name(channel, "channel")
        room = frame.get("room")
        if room is not None and room != "":
            check_name(room, "room")
    except HeraldError as exc:
        raise ProtocolError(exc.detail, path=exc.path) from None
    return channel, room or None


def _resume(value: object) -> tuple[ResumePoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > _MAX_RESUME:
        raise ProtocolError(
            f"resume must be a list of at most {_MAX_RESUME} {{channel, room?, since, epoch?}}",
            path="resume",
        )
    points = []
    for index, item in enumerate(value):
        path = f"resume[{index}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{path} must be an object", path=path)
        channel, room = _channel(item)
        since = item.get("since")
        try:
            parse_offset(since, f"{path}.since")
        except HeraldError as exc:
            raise ProtocolError(exc.detail, path=exc.path) from None
        assert isinstance(since, str)
        points.append(ResumePoint(channel, room, since, _str(item, "epoch")))
    return tuple(points)


def parse_request(frame: dict[str, Any]) -> Request:
    """Validate a decoded frame into a request, or raise `ProtocolError`."""
    op = frame.get("op")
    if op == "subscribe":
        channel, room = _channel(frame)
        since = frame.get("since")
        if since is not None:
            try:
                parse_offset(since)
            except HeraldError as exc:
                raise ProtocolError(exc.detail, path="since") from None
        persist = frame.get("persist", False)
        if not isinstance(persist, bool):
            raise ProtocolError("persist must be a boolean", path="persist")
        return Subscribe(
            _request_id(frame),
            channel,
            room,
            since,
            _str(frame, "subscriber_key"),
            persist,
            _str(frame, "epoch"),
        )
    if op == "unsubscribe":
        channel, room = _channel(frame)
        persist = frame.get("persist", False)
        if not isinstance(persist, bool):
            raise ProtocolError("persist must be a boolean", path="persist")
        return Unsubscribe(_request_id(frame), channel, room, persist)
    if op == "publish":
        channel, room = _channel(frame)
        if "payload" not in frame:
            raise ProtocolError("payload is required", path="payload")
        metadata = frame.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ProtocolError("metadata must be an object", path="metadata")
        return Publish(
            _request_id(frame), channel, room, frame["payload"], metadata, frame.get("audience")
        )
    if op == "ping":
        return Ping(_request_id(frame, required=False))
    if op == "connect":
        try:
            credentials = {n: _str(frame, n) for n in ("key", "token", "connection_key")}
        except ProtocolError as exc:
            # An empty or non-string credential is a wrong credential (4001), not a bad frame.
            raise Unauthorized(exc.detail, path=exc.path) from None
        if sum(v is not None for v in credentials.values()) != 1:
            raise Unauthorized("connect needs exactly one of key, token, connection_key")
        return Connect(
            _request_id(frame, required=False),
            credentials["key"],
            credentials["token"],
            credentials["connection_key"],
            _str(frame, "client"),
            _resume(frame.get("resume")),
        )
    if op == "reply":
        command_id = _str(frame, "command_id", required=True)
        assert command_id is not None
        return Reply(command_id, frame.get("payload"))
    if op is None:
        raise ProtocolError("op is required", path="op")
    raise ProtocolError(f"unknown op {op!r}"[:200], path="op")


class ConnectionState:
    """What one connection has said: its encoding, identity, topics, and bad-frame streak.

    ``receive`` turns a WebSocket message into a request or raises; after an
    error, ``close_code_for`` says whether the connection must now close.
    """

    __slots__ = (
        "authenticated",
        "bad_frames",
        "commands",
        "encoding",
        "max_bad_frames",
        "request_id",
        "topics",
    )

    def __init__(self, encoding: Encoding, *, max_bad_frames: int = 3) -> None:
        self.encoding = encoding
        self.max_bad_frames = max_bad_frames
        self.authenticated = False
        self.bad_frames = 0
        self.request_id: object = None
        self.topics: set[Topic] = set()
        # command id → (the worker waiting for the reply, when it stops waiting), for
        # commands sent to this device and not answered yet: a reply matching none of
        # them is ignored.
        self.commands: dict[str, tuple[str, float]] = {}

    def receive(self, data: bytes | str) -> Request:
        """Decode and validate one message; enforces that ``connect`` comes first.

        ``request_id`` is left holding the frame's ``id`` (when it has a usable
        one) for the answer or the error.
        """
        self.request_id = None
        frame = decode(data, self.encoding)
        request_id = frame.get("id")
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            # Remembered even if the frame is invalid, so the error can echo it.
            self.request_id = request_id
        request = parse_request(frame)
        self.bad_frames = 0
        if not self.authenticated and not isinstance(request, Connect):
            raise Unauthorized("the first frame must be connect")
        if self.authenticated and isinstance(request, Connect):
            raise ProtocolError("already connected", path="op")
        return request

    def close_code_for(self, error: HeraldError) -> CloseCode | None:
        """The close code an error forces, if any (and count bad frames toward 4000)."""
        if not self.authenticated and isinstance(error, ProtocolError | Unauthorized):
            # The first frame must be a valid connect: one that does not even parse is
            # not one either, so it closes 4001 at once rather than after three in a row.
            return CloseCode.UNAUTHORIZED
        if isinstance(error, ProtocolError):
            self.bad_frames += 1
            if self.bad_frames >= self.max_bad_frames:
                return CloseCode.BAD_FRAME
        return None
