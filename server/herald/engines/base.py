"""The engine interface: publish, topic subscriptions, history, records.

Guarantees every engine gives (and the contract suite in ``tests/contract``
checks):

- ``publish`` appends to the topic's history and hands the message to the
  broker in one atomic step, so the id is known before anyone receives it.
  Ids sort in publish order within a topic.
- Delivery to ``on_message`` is at most once, in publish order per topic,
  and only for topics this worker has subscribed to.
- History keeps at least the newest ``history_size`` messages of a topic
  (approximate trimming allowed: it may keep a few more).
- ``recover`` answers ``recovered=False`` whenever messages after ``since``
  may be missing (trimmed, expired, or the history was lost).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from herald.models import (
    App,
    Channel,
    Device,
    KeyRecord,
    Message,
    Recovery,
    StreamPosition,
    Topic,
    offset_key,
    parse_offset,
)

__all__ = ["ControlHandler", "Engine", "MessageHandler", "decide_recovery"]

MessageHandler = Callable[[Message], None]
"""Called by the engine for every message on a subscribed topic. Must not block."""

ControlHandler = Callable[[dict[str, Any]], None]
"""Called on every worker for each `Engine.broadcast` event (this worker's included)."""

T = TypeVar("T")


class Engine(ABC):
    """Base of the memory and Redis engines."""

    @abstractmethod
    async def start(
        self, on_message: MessageHandler, on_control: ControlHandler | None = None
    ) -> None:
        """Connect; from now on call ``on_message`` for subscribed topics and
        ``on_control`` for broadcast events."""

    @abstractmethod
    async def broadcast(self, event: dict[str, Any]) -> None:
        """Hand a small event (msgpack-able) to every worker's ``on_control``, at most once."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; no more ``on_message`` calls after this returns."""

    @abstractmethod
    async def ping(self) -> None:
        """Return if the engine is reachable, else raise `herald.errors.Unavailable`."""

    @abstractmethod
    async def publish(self, channel: Channel, message: Message) -> Message:
        """Store ``message`` in its topic's history and fan it out; return it with its id.

        ``message.id`` and ``created_at`` are assigned here. The channel's
        ``history_size`` and ``history_ttl`` bound the history; its message
        count goes up by one. Raises `Unavailable` when nothing was stored.
        """

    async def publish_many(self, items: list[tuple[Channel, Message]]) -> list[Message]:
        """`publish` each item, in order; engines may send them together.

        All or nothing is not promised: on `Unavailable` some may be stored.
        """
        return [await self.publish(channel, message) for channel, message in items]

    @abstractmethod
    async def subscribe(self, topic: Topic) -> None:
        """Start receiving ``topic``'s messages in this worker (idempotent)."""

    @abstractmethod
    async def unsubscribe(self, topic: Topic) -> None:
        """Stop receiving ``topic``'s messages in this worker (idempotent)."""

    @abstractmethod
    async def history(
        self,
        topic: Topic,
        *,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        reverse: bool = False,
        size: int | None = None,
    ) -> list[Message]:
        """Retained messages with ``since < id < until``, oldest first (newest first if
        ``reverse``), at most ``limit`` of them, taken from the oldest end (newest if
        ``reverse``).

        ``size``, the channel's ``history_size``, leaves out what the engine still
        holds beyond the newest ``size`` (trimming may lag or keep a few more).
        """

    @abstractmethod
    async def recover(self, topic: Topic, since: str, epoch: str | None = None) -> Recovery:
        """Every retained message after ``since`` and whether that is all that was missed.

        Messages and position are read in one atomic step. ``recovered`` follows
        `decide_recovery`.
        """

    @abstractmethod
    async def position(self, topic: Topic) -> StreamPosition:
        """The id of the newest message of ``topic`` ("0-0" when none) and the epoch."""

    @abstractmethod
    async def create_channel(self, channel: Channel) -> bool:
        """Store a new channel; ``False`` (and nothing stored) when the name is taken."""

    @abstractmethod
    async def get_channel(self, app: str, name: str) -> Channel | None:
        """The channel, or ``None``."""

    @abstractmethod
    async def save_channel(self, channel: Channel) -> None:
        """Overwrite an existing channel's record (not its message count)."""

    @abstractmethod
    async def list_channels(self, app: str, *, after: str | None, limit: int) -> list[Channel]:
        """Channels of ``app`` sorted by name, starting after ``after``, at most ``limit``."""

    @abstractmethod
    async def add_key(self, key: KeyRecord) -> None:
        """Store an app key record (hash only); a record with the same id is replaced."""

    @abstractmethod
    async def find_key(self, key_hash: str) -> KeyRecord | None:
        """The key record with that hash, or ``None``."""

    @abstractmethod
    async def find_key_by_id(self, key_id: str) -> KeyRecord | None:
        """The key record with that id, or ``None``."""

    @abstractmethod
    async def list_keys(self, app: str) -> list[KeyRecord]:
        """Every key of ``app``, oldest first."""

    @abstractmethod
    async def delete_key(self, app: str, key_id: str) -> KeyRecord | None:
        """Remove a key of ``app``; the removed record, or ``None`` if there was none."""

    @abstractmethod
    async def add_subscription(self, app: str, target: str, subscriber: str) -> bool:
        """Record a persistent subscription (``target`` is ``channel`` or
        ``channel|room``); ``False`` if it existed."""

    @abstractmethod
    async def remove_subscription(self, app: str, target: str, subscriber: str) -> bool:
        """Forget a persistent subscription; ``False`` if there was none."""

    @abstractmethod
    async def subscriptions(self, app: str, subscriber: str) -> list[str]:
        """The targets a subscriber persistently subscribes to, sorted."""

    @abstractmethod
    async def subscribers(self, app: str, channel: str) -> list[str]:
        """Who persistently subscribes to a channel (any of its rooms), sorted."""

    @abstractmethod
    async def drop_subscribers(self, app: str, channel: str) -> None:
        """Forget every persistent subscription to a channel (it was closed)."""

    @abstractmethod
    async def report_presence(self, worker: str, counts: dict[str, int], ttl: float) -> None:
        """Publish this worker's live connection counts (``"app|channel"`` → connections),
        valid for ``ttl`` seconds unless reported again; replaces the last report."""

    @abstractmethod
    async def refresh_presence(self, worker: str, ttl: float) -> bool:
        """Keep this worker's last report (and the worker) fresh for ``ttl`` more seconds,
        unchanged; ``False`` when no report with counts is held (expired, lost, or it had
        none), so the caller must report in full."""

    @abstractmethod
    async def presence(self, app: str, name: str, exclude: str) -> int:
        """Live connections to a channel on every worker but ``exclude``, per their reports."""

    @abstractmethod
    async def touch_idle(self, app: str, name: str, deadline: float | None) -> None:
        """Set (unix time) or clear (``None``) when a channel closes for want of publishes."""

    @abstractmethod
    async def claim_idle(self, now: float) -> list[tuple[str, str]]:
        """(app, name) of channels whose idle deadline passed; each is handed to exactly
        one caller, across every worker, and forgotten."""

    @abstractmethod
    async def put_if_absent(self, key: str, value: bytes, ttl: int) -> bytes | None:
        """Hold ``value`` under ``key`` for ``ttl`` seconds unless the key is held already;
        ``None`` when stored, else the value held (atomic: one caller wins)."""

    @abstractmethod
    async def put(self, key: str, value: bytes, ttl: int) -> None:
        """Hold ``value`` under ``key`` for ``ttl`` seconds, whatever was there."""

    @abstractmethod
    async def forget(self, key: str) -> None:
        """Drop ``key`` (no-op if absent)."""

    @abstractmethod
    async def add_device(self, device: Device) -> Device | None:
        """Store a new device, unless its app has one with the same (platform, address):
        then answer that one and store nothing (atomic: of two racing adds, one stores)."""

    @abstractmethod
    async def get_device(self, app: str, device_id: str) -> Device | None:
        """The device, or ``None``."""

    @abstractmethod
    async def find_device(self, app: str, platform: str, address: str) -> Device | None:
        """The app's device with that (platform, address), or ``None``."""

    @abstractmethod
    async def update_device(
        self, app: str, device_id: str, change: Callable[[Device], T]
    ) -> tuple[Device, T] | None:
        """Apply ``change`` to the stored device and store the result; ``None`` if there
        is no such device.

        No other update interleaves: a store shared by workers retries ``change`` on
        a fresh copy when another write came first. If ``change`` raises, nothing is
        stored and the exception propagates. Answers the stored device and what
        ``change`` returned.
        """

    @abstractmethod
    async def delete_device(self, app: str, device_id: str) -> Device | None:
        """Forget a device and its (platform, address) entry; the removed device, or ``None``."""

    @abstractmethod
    async def set_connection(self, app: str, device_id: str, client_id: str) -> None:
        """Record that connection ``client_id`` (``"<worker>/<n>"``) now holds the device."""

    @abstractmethod
    async def clear_connection(self, app: str, device_id: str, client_id: str) -> None:
        """Forget the device's connection, if it is still ``client_id`` (atomic)."""

    @abstractmethod
    async def connections(self, app: str, device_ids: list[str]) -> dict[str, str]:
        """device id → client id holding it, for those connected to a live worker.

        A worker is live while its last `report_presence` is fresh, so the
        connections of a worker that died are not answered.
        """

    @abstractmethod
    async def create_app(self, app: App) -> bool:
        """Store a new app; ``False`` (and nothing stored) when the name is taken."""

    @abstractmethod
    async def get_app(self, name: str) -> App | None:
        """The app, or ``None``."""

    @abstractmethod
    async def list_apps(self) -> list[App]:
        """Every app, sorted by name."""


def decide_recovery(
    since: str,
    epoch: str | None,
    position: StreamPosition,
    *,
    dropped: str,
    since_retained: bool,
) -> bool:
    """Whether the messages retained after ``since`` are all that were published after it.

    ``dropped`` is the newest id trimmed or expired away ("0-0" if none). True
    only when the epoch (if the client gave one) is current, ``since`` is not
    ahead of the newest id nor behind the trim point, and ``since`` is either
    still retained, exactly the trim point, or "0-0" with nothing ever dropped.
    An unknown ``since`` inside the range is not trusted: after the history was
    lost and rebuilt, old ids fall in the new range but were never in it.
    """
    if epoch is not None and epoch != position.epoch:
        return False
    key = parse_offset(since)
    floor = offset_key(dropped)
    if not floor <= key <= offset_key(position.offset):
        return False
    return since_retained or key == floor
