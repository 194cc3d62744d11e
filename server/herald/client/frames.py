"""The client's side of the WebSocket protocol, without I/O.

Encoding and decoding frames, the value types the client hands to
applications, the ordering of message ids, which close codes end the client
for good, and the reconnect delays. Nothing here touches a socket, so all of
it can be checked with plain values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import orjson

__all__ = [
    "FATAL_CLOSE_CODES",
    "Backoff",
    "Command",
    "EncodingName",
    "Frame",
    "Gap",
    "Message",
    "Position",
    "TopicKey",
    "decode",
    "encode",
    "handshake_fatal",
    "id_key",
    "is_newer",
    "subprotocol",
]

Frame = dict[str, Any]
"""One decoded protocol frame: an object with an ``op``."""

EncodingName = Literal["json", "msgpack"]
"""How frames travel: ``json`` (text frames) or ``msgpack`` (binary frames)."""

TopicKey = tuple[str, str]
"""``(channel, room)``; the room of a default channel is ``""``, as the server says it."""

FATAL_CLOSE_CODES = frozenset({4001, 4003})
"""Close codes after which reconnecting cannot help: the credentials are wrong (4001)
or lack the right (4003). Every other close (1012 restart, 4008 slow consumer, 1006
dropped link, ...) is worth a reconnect with ``since``."""


def subprotocol(encoding: EncodingName) -> str:
    """The WebSocket subprotocol that selects ``encoding``."""
    if encoding not in ("json", "msgpack"):
        raise ValueError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
    return f"herald.{encoding}"


def encode(frame: Frame, encoding: EncodingName) -> str | bytes:
    """Serialise a client frame: a ``str`` (sent as a text frame) for JSON, ``bytes``
    (a binary frame) for msgpack, since the server holds each subprotocol to its type."""
    if encoding == "json":
        return orjson.dumps(frame).decode()
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


def decode(data: str | bytes) -> Frame:
    """Parse one server message into a frame; raises `ValueError` if it is not one.

    The frame type says the encoding (the server sends JSON as text and msgpack
    as binary), so this needs no state.
    """
    try:
        frame = orjson.loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)
    except Exception as exc:  # orjson and msgpack raise several types: all mean "garbage"
        raise ValueError(f"undecodable frame: {exc}") from None
    if not isinstance(frame, dict):
        raise ValueError("a frame must be an object")
    return frame


def id_key(message_id: str) -> tuple[int, int] | None:
    """The sort key of a message id (``"<ms>-<seq>"``), or None if it has another shape."""
    ms, sep, seq = message_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        return None
    return int(ms), int(seq)


def is_newer(message_id: str, cursor: str | None) -> bool:
    """Whether a message comes after ``cursor`` (the last id delivered) on its topic.

    Ids sort in publish order within a topic, so anything not newer than the
    cursor was delivered already: this one test drops replays that overlap the
    live stream and duplicates of every other kind. Ids of an unknown shape
    cannot be ordered; only an exact repeat of the cursor is dropped then.
    """
    if cursor is None:
        return True
    new, old = id_key(message_id), id_key(cursor)
    if new is None or old is None:
        return message_id != cursor
    return new > old


def handshake_fatal(status: int) -> bool:
    """Whether an HTTP status refusing the WebSocket upgrade is worth no retry.

    A 4xx says the request itself is wrong (path, origin, credentials) except
    for 408 and 429, which say "later"; 5xx and the rest are passing troubles.
    """
    return 400 <= status < 500 and status not in (408, 429)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a topic stood when the server answered ``subscribed``: its newest id and
    the epoch of its history (a new epoch means the history was lost and rebuilt)."""

    offset: str
    epoch: str

    @classmethod
    def from_frame(cls, frame: Frame) -> Position:
        """The ``position`` of a ``subscribed`` frame."""
        position = frame.get("position") or {}
        return cls(str(position.get("offset", "0-0")), str(position.get("epoch", "")))


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a channel, as a subscriber receives it (or history returns it)."""

    id: str
    """The history offset; sorts in publish order within the topic."""
    channel: str
    room: str
    """``""`` on a default channel."""
    payload: Any
    author: dict[str, Any] | None
    """``{"type": "key" | "user" | "device", "id": ...}``."""
    created_at: str
    """RFC 3339 with microseconds, UTC."""
    metadata: dict[str, Any] | None = None

    @classmethod
    def from_frame(cls, frame: Frame) -> Message:
        """Build from a ``message`` frame or an HTTP API message object (extra fields,
        such as ``links``, are ignored)."""
        return cls(
            id=str(frame["id"]),
            channel=str(frame["channel"]),
            room=str(frame.get("room") or ""),
            payload=frame.get("payload"),
            author=frame.get("author"),
            created_at=str(frame.get("created_at", "")),
            metadata=frame.get("metadata"),
        )


@dataclass(frozen=True, slots=True)
class Command:
    """A command sent to this device. ``channel`` is set for a multicast to a channel's
    device subscribers (``chref:``), which nobody waits to hear back from."""

    id: str
    payload: Any
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """A resubscription the server could not fully recover (``recovered: false``):
    messages after ``since`` were trimmed, expired or lost with the history."""

    since: str | None
    """The last id the subscription had delivered when it asked to recover."""
    position: Position
    """The topic's position in the answer; delivery resumes from what it retains."""
    epoch_changed: bool
    """Whether the history itself was replaced (lost and rebuilt) since then."""


@dataclass
class Backoff:
    """Reconnect delays: exponential from ``min_delay`` to ``max_delay``, with full jitter.

    Each delay is drawn uniformly between ``min_delay`` and the current cap, so a
    crowd of clients dropped at once (a server restart) does not come back in
    lockstep. `reset` once a connection is fully established.
    """

    min_delay: float = 0.1
    max_delay: float = 10.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay <= self.max_delay:
            raise ValueError("backoff needs 0 <= min_delay <= max_delay")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        # Capping the exponent keeps a client that retries for days from overflowing.
        cap = min(self.max_delay, self.min_delay * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return self.rng.uniform(self.min_delay, cap)

    def reset(self) -> None:
        """Start again from ``min_delay``."""
        self.attempts = 0
