"""The embedded engine: one process, no Redis, nothing kept across restarts.

Message ids have the Redis stream shape (``<ms>-<seq>``), so clients cannot
tell the engines apart. Each topic gets a fresh random epoch per process.
"""

from __future__ import annotations

import secrets
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from herald.codec import packb
from herald.engines.base import ControlHandler, Engine, MessageHandler, decide_recovery
from herald.errors import Unavailable
from herald.models import (
    App,
    Channel,
    Device,
    KeyRecord,
    Message,
    Recovery,
    StreamPosition,
    Topic,
    now_rfc3339,
    parse_offset,
)

__all__ = ["MemoryEngine"]

_ZERO = (0, 0)

T = TypeVar("T")


def _copy(device: Device) -> Device:
    return Device.from_record(device.to_record())


def _identity(device: Device) -> tuple[str, str, str, str]:
    return (device.id, device.app, device.platform, device.address)


# A retained message is its fields but the id (`Message.fields`) packed as MessagePack,
# beside its stream key as one int (ms << 64 | seq, which is the id) in a second deque.
# Neither is an object the garbage collector tracks, so publishing leaves nothing
# behind for it: the young collections that retained tuples kept triggering (every
# 50,000 messages, 16-22 ms each on bench/path.py's 10,000 channels, 37-49 ms in a
# worker holding 10,000 connections) stop, and full collections never walk the
# history (up to history_size per topic). Packing costs on the publish path,
# unpacking only on history reads.
_SEQ_BITS = 64
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def _int_key(key: tuple[int, int]) -> int:
    return key[0] << _SEQ_BITS | key[1]


def _pair_key(key: int) -> tuple[int, int]:
    return key >> _SEQ_BITS, key & _SEQ_MASK


def _message(key: int, retained: bytes) -> Message:
    ms, seq = _pair_key(key)
    return Message(f"{ms}-{seq}", *msgpack.unpackb(retained, raw=False))


@dataclass(slots=True)
class _Stream:
    """One topic's bounded history."""

    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    messages: deque[bytes] = field(default_factory=deque)
    keys: deque[int] = field(default_factory=deque)  # each message's, as `_int_key`
    last: tuple[int, int] = _ZERO
    # Every id at or below this one may have been dropped (trimmed or expired).
    dropped: tuple[int, int] = _ZERO
    expires_at: float | None = None
    # Whether the worker listens to this topic: an attribute the publish path reads
    # anyway, not a second lookup by topic.
    subscribed: bool = False

    def expire(self, now: float) -> None:
        if self.expires_at is not None and now >= self.expires_at and self.messages:
            self.messages.clear()
            self.keys.clear()
            self.dropped = self.last
            self.expires_at = None

    def next_id(self, ms: int) -> tuple[int, int]:
        """The id after the last one, at ``ms`` (milliseconds since the epoch) or later."""
        last_ms, last_seq = self.last
        return (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)


class MemoryEngine(Engine):
    """Everything in dicts of this process. Single worker only."""

    def __init__(self) -> None:
        self._on_message: MessageHandler | None = None
        self._on_control: ControlHandler | None = None
        self._apps: dict[str, App] = {}
        self._values: dict[str, tuple[float, bytes]] = {}
        self._idle: dict[tuple[str, str], float] = {}
        self._subscribers: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._subscriptions: dict[tuple[str, str], set[str]] = {}
        # Keyed by topic; any equal tuple finds an entry, as the publish path's do.
        self._streams: dict[tuple[str, str, str], _Stream] = {}
        self._channels: dict[tuple[str, str], Channel] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._key_ids: dict[str, str] = {}
        self._devices: dict[tuple[str, str], Device] = {}  # (app, id) → device
        self._addresses: dict[tuple[str, str, str], str] = {}  # (app, platform, address) → id
        self._online: dict[tuple[str, str], str] = {}  # (app, device id) → client id

    async def start(
        self, on_message: MessageHandler, on_control: ControlHandler | None = None
    ) -> None:
        """Remember the handlers; nothing to connect to."""
        self._on_message = on_message
        self._on_control = on_control

    async def close(self) -> None:
        """Stop delivering."""
        self._on_message = None
        self._on_control = None

    async def broadcast(self, event: dict[str, Any]) -> None:
        """One process: the only worker is this one."""
        if self._on_control is not None:
            self._on_control(event)

    async def ping(self) -> None:
        """Always reachable while started."""
        if self._on_message is None:
            raise Unavailable("engine is not started")

    def _stream(self, topic: Topic) -> _Stream:
        stream = self._streams.get(topic)
        if stream is None:
            stream = self._streams[topic] = _Stream()
        stream.expire(time.monotonic())
        return stream

    async def publish(self, channel: Channel, message: Message) -> Message:
        """Append and deliver in one synchronous step: atomic by construction."""
        [stored] = await self.publish_many([(channel, message)])
        return stored

    async def publish_many(self, items: list[tuple[Channel, Message]]) -> list[Message]:
        """`publish` each, with one timestamp for the batch; never awaits in between."""
        created_at = now_rfc3339()
        # Read once per batch: ids stay ordered within a stream whatever the clock says.
        ms, now = int(time.time() * 1000), time.monotonic()
        return [self._append(channel, message, created_at, ms, now) for channel, message in items]

    def _append(
        self, channel: Channel, message: Message, created_at: str, ms: int, now: float
    ) -> Message:
        """Fills in the message's id and created_at, stores it, hands it to the hub."""
        if self._on_message is None:
            raise Unavailable("engine is not started")
        # A plain tuple finds the Topic key (equal, same hash) without building one.
        topic = (message.app, message.channel, message.room)
        stream = self._streams.get(topic)
        if stream is None:
            stream = self._streams[topic] = _Stream()
        elif stream.expires_at is not None:
            stream.expire(now)
        key = stream.next_id(ms)
        message.id = f"{key[0]}-{key[1]}"
        message.created_at = created_at
        stream.last = key
        retained, keys = stream.messages, stream.keys
        retained.append(packb(message.fields()))
        keys.append(_int_key(key))
        while len(retained) > channel.history_size:
            retained.popleft()
            stream.dropped = _pair_key(keys.popleft())
        if channel.history_ttl:
            stream.expires_at = now + channel.history_ttl
        stored = self._channels.get((channel.app, channel.name))
        if stored is not None:
            stored.messages += 1
        if stream.subscribed:
            self._on_message(message)
        return message

    async def subscribe(self, topic: Topic) -> None:
        """Deliver ``topic`` from now on."""
        self._stream(topic).subscribed = True

    async def unsubscribe(self, topic: Topic) -> None:
        """Stop delivering ``topic``."""
        stream = self._streams.get(topic)
        if stream is not None:
            stream.subscribed = False

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
        """Slice the retained deque by id with two binary searches."""
        stream = self._streams.get(topic)
        if stream is None or limit <= 0:
            return []
        stream.expire(time.monotonic())
        retained, keys = stream.messages, stream.keys
        lo = 0 if since is None else bisect_right(keys, _int_key(parse_offset(since)))
        if size is not None:
            # A smaller history_size trims at the next publish; until then, read less.
            lo = max(lo, len(keys) - size)
        hi = len(keys) if until is None else bisect_left(keys, _int_key(parse_offset(until)))
        if lo >= hi:
            return []
        if reverse:
            start = max(lo, hi - limit)
            return [_message(keys[i], retained[i]) for i in range(hi - 1, start - 1, -1)]
        return [_message(keys[i], retained[i]) for i in range(lo, min(hi, lo + limit))]

    async def recover(self, topic: Topic, since: str, epoch: str | None = None) -> Recovery:
        """Everything retained after ``since``; ``recovered`` as `decide_recovery` says."""
        stream = self._stream(topic)
        key = parse_offset(since)
        position = StreamPosition(f"{stream.last[0]}-{stream.last[1]}", stream.epoch)
        kept, keys = stream.messages, stream.keys
        wanted = _int_key(key)
        lo = bisect_left(keys, wanted)
        retained = lo < len(keys) and keys[lo] == wanted
        if retained:
            lo += 1
        messages = [_message(keys[i], kept[i]) for i in range(lo, len(kept))]
        dropped = f"{stream.dropped[0]}-{stream.dropped[1]}"
        recovered = decide_recovery(
            since, epoch, position, dropped=dropped, since_retained=retained
        )
        return Recovery(messages, recovered, position)

    async def position(self, topic: Topic) -> StreamPosition:
        """The newest id and the epoch."""
        stream = self._stream(topic)
        return StreamPosition(f"{stream.last[0]}-{stream.last[1]}", stream.epoch)

    async def create_channel(self, channel: Channel) -> bool:
        """Insert unless the name is taken."""
        key = (channel.app, channel.name)
        if key in self._channels:
            return False
        self._channels[key] = Channel.from_record(channel.to_record())
        return True

    async def get_channel(self, app: str, name: str) -> Channel | None:
        """A copy, so callers cannot change the stored record by accident."""
        channel = self._channels.get((app, name))
        return None if channel is None else Channel.from_record(channel.to_record())

    async def save_channel(self, channel: Channel) -> None:
        """Overwrite, keeping the stored message count."""
        key = (channel.app, channel.name)
        stored = self._channels.get(key)
        copy = Channel.from_record(channel.to_record())
        if stored is not None:
            copy.messages = stored.messages
        self._channels[key] = copy

    async def list_channels(self, app: str, *, after: str | None, limit: int) -> list[Channel]:
        """Sorted by name; a linear scan is fine for an embedded, single-process engine."""
        names = sorted(n for (a, n) in self._channels if a == app and (after is None or n > after))
        return [Channel.from_record(self._channels[(app, n)].to_record()) for n in names[:limit]]

    async def add_key(self, key: KeyRecord) -> None:
        """Index by hash, replacing a record with the same id."""
        old = self._key_ids.get(key.id)
        if old is not None:
            self._keys.pop(old, None)
        self._keys[key.key_hash] = key
        self._key_ids[key.id] = key.key_hash

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        """Look up by hash."""
        return self._keys.get(key_hash)

    async def find_key_by_id(self, key_id: str) -> KeyRecord | None:
        """Look up by id."""
        key_hash = self._key_ids.get(key_id)
        return None if key_hash is None else self._keys.get(key_hash)

    async def list_keys(self, app: str) -> list[KeyRecord]:
        """Keys of ``app`` in creation order (dicts keep insertion order)."""
        return [key for key in self._keys.values() if key.app == app]

    async def delete_key(self, app: str, key_id: str) -> KeyRecord | None:
        """Drop the key from both indexes."""
        key_hash = self._key_ids.get(key_id)
        key = None if key_hash is None else self._keys.get(key_hash)
        if key is None or key.app != app:
            return None
        del self._key_ids[key_id]
        del self._keys[key.key_hash]
        return key

    async def create_app(self, app: App) -> bool:
        """Insert unless the name is taken."""
        if app.name in self._apps:
            return False
        self._apps[app.name] = app
        return True

    async def get_app(self, name: str) -> App | None:
        """Apps are immutable values: no copy needed."""
        return self._apps.get(name)

    async def list_apps(self) -> list[App]:
        """Sorted by name."""
        return [self._apps[name] for name in sorted(self._apps)]

    def _held(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._values[key]
            return None
        return entry[1]

    async def put_if_absent(self, key: str, value: bytes, ttl: int) -> bytes | None:
        """One process, no await between check and set: atomic."""
        held = self._held(key)
        if held is None:
            self._values[key] = (time.monotonic() + ttl, value)
        return held

    async def put(self, key: str, value: bytes, ttl: int) -> None:
        """Overwrite."""
        self._values[key] = (time.monotonic() + ttl, value)

    async def forget(self, key: str) -> None:
        """Drop."""
        self._values.pop(key, None)

    async def touch_idle(self, app: str, name: str, deadline: float | None) -> None:
        """Set or clear the deadline."""
        if deadline is None:
            self._idle.pop((app, name), None)
        else:
            self._idle[(app, name)] = deadline

    async def claim_idle(self, now: float) -> list[tuple[str, str]]:
        """Pop every passed deadline."""
        due = [channel for channel, deadline in self._idle.items() if deadline <= now]
        for channel in due:
            del self._idle[channel]
        return due

    async def report_presence(self, worker: str, counts: dict[str, int], ttl: float) -> None:
        """One process has one worker: nothing to share."""

    async def refresh_presence(self, worker: str, ttl: float) -> bool:
        """Nothing was shared, so nothing can be lost."""
        return True

    async def presence(self, app: str, name: str, exclude: str) -> int:
        """No other worker exists."""
        return 0

    async def add_subscription(self, app: str, target: str, subscriber: str) -> bool:
        """Two indexes: by channel and by subscriber."""
        channel = target.partition("|")[0]
        entries = self._subscribers.setdefault((app, channel), set())
        if (target, subscriber) in entries:
            return False
        entries.add((target, subscriber))
        self._subscriptions.setdefault((app, subscriber), set()).add(target)
        return True

    async def remove_subscription(self, app: str, target: str, subscriber: str) -> bool:
        """Drop from both indexes."""
        channel = target.partition("|")[0]
        entries = self._subscribers.get((app, channel), set())
        if (target, subscriber) not in entries:
            return False
        entries.discard((target, subscriber))
        self._subscriptions.get((app, subscriber), set()).discard(target)
        return True

    async def subscriptions(self, app: str, subscriber: str) -> list[str]:
        """Sorted targets."""
        return sorted(self._subscriptions.get((app, subscriber), set()))

    async def subscribers(self, app: str, channel: str) -> list[str]:
        """Sorted, each subscriber once."""
        return sorted({who for _, who in self._subscribers.get((app, channel), set())})

    async def drop_subscribers(self, app: str, channel: str) -> None:
        """Forget the channel's entries in both indexes."""
        for target, subscriber in self._subscribers.pop((app, channel), set()):
            self._subscriptions.get((app, subscriber), set()).discard(target)

    async def add_device(self, device: Device) -> Device | None:
        """Insert unless the (platform, address) is taken; no await in between: atomic."""
        address = (device.app, device.platform, device.address)
        held = self._addresses.get(address)
        if held is not None:
            return _copy(self._devices[(device.app, held)])
        self._addresses[address] = device.id
        self._devices[(device.app, device.id)] = _copy(device)
        return None

    async def get_device(self, app: str, device_id: str) -> Device | None:
        """A copy, so callers cannot change the stored record by accident."""
        device = self._devices.get((app, device_id))
        return None if device is None else _copy(device)

    async def find_device(self, app: str, platform: str, address: str) -> Device | None:
        """Follow the address index."""
        device_id = self._addresses.get((app, platform, address))
        return None if device_id is None else await self.get_device(app, device_id)

    async def update_device(
        self, app: str, device_id: str, change: Callable[[Device], T]
    ) -> tuple[Device, T] | None:
        """``change`` a copy, then store a copy of it; nothing awaits in between.

        ``change`` must not alter the id, app, platform or address (the index is
        derived from them): it raises `ValueError` and stores nothing if it does.
        """
        stored = self._devices.get((app, device_id))
        if stored is None:
            return None
        device = _copy(stored)
        result = change(device)
        if _identity(device) != _identity(stored):
            raise ValueError("a device's id, app, platform and address cannot change")
        self._devices[(app, device_id)] = _copy(device)
        return device, result

    async def delete_device(self, app: str, device_id: str) -> Device | None:
        """Drop the record, its address entry and its connection."""
        device = self._devices.pop((app, device_id), None)
        if device is None:
            return None
        self._addresses.pop((app, device.platform, device.address), None)
        self._online.pop((app, device_id), None)
        return device

    async def set_connection(self, app: str, device_id: str, client_id: str) -> None:
        """Record (or replace) the device's connection."""
        self._online[(app, device_id)] = client_id

    async def clear_connection(self, app: str, device_id: str, client_id: str) -> None:
        """Forget the connection unless a newer one replaced it."""
        if self._online.get((app, device_id)) == client_id:
            del self._online[(app, device_id)]

    async def connections(self, app: str, device_ids: list[str]) -> dict[str, str]:
        """Every recorded connection: the one worker is this process, alive while asked."""
        found = ((device_id, self._online.get((app, device_id))) for device_id in device_ids)
        return {device_id: client for device_id, client in found if client is not None}
