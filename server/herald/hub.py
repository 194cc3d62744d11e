"""Local fan-out: topic → connections of this worker.

`Hub.deliver` is synchronous and never awaits: it encodes a message once per
encoding in use, builds the WebSocket frame once, and appends the same bytes
to each subscriber's outbox. Outboxes are flushed once per event-loop
iteration, so frames that pile up for one connection leave in one write.
There is no backpressure here by design: a subscriber whose outbox grows
past its limit is closed as slow by its transport, never waited for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterator
from typing import Protocol

from herald.audience import matches
from herald.metrics import DELIVERED, observe_latency
from herald.models import Device, Message, Topic, offset_key
from herald.protocol import JSON, MSGPACK, Encoding, encode, message_frame, ws_frame

__all__ = ["Hub", "Subscriber"]

logger = logging.getLogger("herald.hub")

# Seconds of writes after which a flush lets the loop read sockets again. Before,
# the next flush waited as long as the last one took: a message arriving then waited
# too, and the worker sat idle whenever nothing else was ready to run.
_FLUSH_SLICE = 0.005
_CLOCK_EVERY = 64  # writes between two looks at the clock


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    encoding: Encoding
    device: Device | None
    """The device this connection is, if it is one: devices see messages by audience."""

    def push(self, frame: bytes) -> None:
        """Queue ready-made frame bytes. Never blocks, never awaits."""

    def flush(self) -> None:
        """Write everything queued in one go."""


class _Topic:
    __slots__ = ("devices", "floors", "json", "last", "msgpack", "pending")

    def __init__(self) -> None:
        # The id of the newest message delivered here: where a new subscriber starts.
        self.last: str | None = None
        # Dicts, not lists or sets: O(1) removal and a stable, insertion-ordered walk.
        self.json: dict[Subscriber, None] = {}
        self.msgpack: dict[Subscriber, None] = {}
        # Devices apart: each message is checked against each one's opt-in and tags,
        # which the plain subscribers above never pay for.
        self.devices: dict[Subscriber, None] = {}
        # Subscribers still replaying history: live messages wait here until they are caught up.
        self.pending: dict[Subscriber, list[Message]] = {}
        # Subscribers made live after a replay up to some id: a message at or below it
        # that the broker delivers late was in the replay already. Cleared by the first
        # message past it (a topic's messages arrive in order).
        self.floors: dict[Subscriber, tuple[int, int]] = {}

    def live(self, subscriber: Subscriber) -> dict[Subscriber, None]:
        """The set a live subscriber belongs to."""
        if subscriber.device is not None:
            return self.devices
        return self.json if subscriber.encoding is Encoding.JSON else self.msgpack

    def empty(self) -> bool:
        return not (self.json or self.msgpack or self.devices or self.pending)


def frame_bytes(message: Message, encoding: Encoding) -> bytes:
    """The complete WebSocket frame carrying ``message`` in ``encoding``."""
    return ws_frame(encode(message_frame(message), encoding), binary=encoding is MSGPACK)


class Hub:
    """The topics this worker serves and who listens to each."""

    def __init__(self) -> None:
        # Keyed by topic; any equal tuple finds an entry, as `deliver`'s do.
        self._topics: dict[tuple[str, str, str], _Topic] = {}
        # A dict, not a list: scheduling the same subscriber twice still flushes it once.
        self._dirty: dict[Subscriber, None] = {}
        # What a flush slice left for the next: iterators over the dicts it took, which
        # nothing writes to any more. Copying the rest into a new dict each slice cost
        # the hub 3.7 ms of a 102 ms pass over 10,000 connections (bench/hubpass.py).
        self._left: list[Iterator[Subscriber]] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Deliveries not yet added to the DELIVERED counter: a multiprocess counter
        # costs a lock and a file write per call, so it is bumped once per flush pass.
        self._delivered = 0
        self.version = 0
        """Counts every change of who listens to what (what `subscribers` answers)."""

    def __len__(self) -> int:
        return len(self._topics)

    def subscribers(self, topic: Topic) -> int:
        """How many local connections listen to ``topic`` (live or catching up)."""
        entry = self._topics.get(topic)
        if entry is None:
            return 0
        return len(entry.json) + len(entry.msgpack) + len(entry.devices) + len(entry.pending)

    def last_id(self, topic: Topic) -> str | None:
        """The id of the newest message of ``topic`` delivered here, if any was."""
        entry = self._topics.get(topic)
        return None if entry is None else entry.last

    def listeners(self, topic: Topic) -> list[Subscriber]:
        """The local connections listening to ``topic`` (live or catching up)."""
        entry = self._topics.get(topic)
        if entry is None:
            return []
        return [*entry.json, *entry.msgpack, *entry.devices, *entry.pending]

    def begin(self, topic: Topic, subscriber: Subscriber) -> None:
        """Start buffering ``topic``'s live messages for a subscriber that is catching up."""
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = _Topic()
        entry.pending[subscriber] = []
        self.version += 1

    def activate(self, topic: Topic, subscriber: Subscriber, after: str) -> list[Message]:
        """Make a catching-up subscriber live; return what arrived meanwhile after ``after``.

        The caller sends those before returning to the loop, so no live
        message can slip between the replay and the live stream.
        """
        entry = self._topics[topic]
        buffered = entry.pending.pop(subscriber, [])
        entry.live(subscriber)[subscriber] = None
        floor = offset_key(after)
        entry.floors[subscriber] = floor
        return [m for m in buffered if offset_key(m.id) > floor]

    def drop(self, topic: Topic) -> list[Subscriber]:
        """Forget a topic; every subscriber it had (live or catching up)."""
        subscribers = self.listeners(topic)
        self._topics.pop(topic, None)
        self.version += 1
        return subscribers

    def remove(self, topic: Topic, subscriber: Subscriber) -> None:
        """Forget a subscriber of ``topic`` (live or pending); no-op if absent."""
        entry = self._topics.get(topic)
        if entry is None:
            return
        self.version += 1
        entry.floors.pop(subscriber, None)
        if entry.pending.pop(subscriber, None) is None:
            entry.live(subscriber).pop(subscriber, None)
        if entry.empty():
            del self._topics[topic]

    def deliver(self, message: Message) -> None:
        """Fan ``message`` out to this worker's subscribers of its topic. Never awaits."""
        # A plain tuple finds the Topic key (equal, same hash) without building one.
        entry = self._topics.get((message.app, message.channel, message.room))
        if entry is None:
            return
        entry.last = message.id
        observe_latency(message.created_at)
        # Each test below guards a loop or an allocation that most messages do not need:
        # this runs once per message and subscriber set, tens of thousands of times a second.
        if entry.pending:
            for buffered in entry.pending.values():
                buffered.append(message)
        if entry.floors:
            self._delivered += self._deliver_past_floors(entry, message)
            return
        delivered = 0
        json_frame = msgpack_frame = None
        if message.audience is None:
            live = entry.json
            if live:
                json_frame = frame_bytes(message, JSON)
                for subscriber in live:
                    subscriber.push(json_frame)
                delivered = len(live)
            live = entry.msgpack
            if live:
                msgpack_frame = frame_bytes(message, MSGPACK)
                for subscriber in live:
                    subscriber.push(msgpack_frame)
                delivered += len(live)
        if entry.devices:
            frames: dict[Encoding, bytes] = {}
            if json_frame is not None:
                frames[JSON] = json_frame
            if msgpack_frame is not None:
                frames[MSGPACK] = msgpack_frame
            delivered += self._deliver_to_devices(entry.devices, message, (), frames)
        self._delivered += delivered

    @staticmethod
    def _deliver_to_devices(
        devices: dict[Subscriber, None],
        message: Message,
        skip: Collection[Subscriber],
        frames: dict[Encoding, bytes],
    ) -> int:
        """Each device that sees the message gets it; ``frames`` holds the frames
        made already (each encoding is framed once per message). Answers how many
        got it."""
        audience = message.audience
        pushed = 0
        for subscriber in devices:
            device = subscriber.device
            assert device is not None
            if not device.opt_in or subscriber in skip:
                continue
            if audience is not None and not matches(audience, device):
                continue
            frame = frames.get(subscriber.encoding)
            if frame is None:
                frame = frames[subscriber.encoding] = frame_bytes(message, subscriber.encoding)
            subscriber.push(frame)
            pushed += 1
        return pushed

    def _deliver_past_floors(self, entry: _Topic, message: Message) -> int:
        """The slow path, taken only just after a replay: skip what was replayed.
        Answers how many subscribers got the message."""
        pushed = 0
        key = offset_key(message.id)
        skip = {s for s, floor in entry.floors.items() if key <= floor}
        entry.floors = {s: floor for s, floor in entry.floors.items() if key <= floor}
        frames: dict[Encoding, bytes] = {}
        if message.audience is None:
            for live, encoding in ((entry.json, JSON), (entry.msgpack, MSGPACK)):
                if live:
                    frame = frames[encoding] = frame_bytes(message, encoding)
                    for subscriber in live:
                        if subscriber not in skip:
                            subscriber.push(frame)
                            pushed += 1
        if entry.devices:
            pushed += self._deliver_to_devices(entry.devices, message, skip, frames)
        return pushed

    def schedule_flush(self, subscriber: Subscriber) -> None:
        """Have ``subscriber.flush()`` called once, at the next flush of the hub.

        Flushes run at the end of the loop iteration, a slice of about
        `_FLUSH_SLICE` at a time: a fan-out to many connections lets the loop
        read sockets (Redis, publishes) between slices, and a connection whose
        turn has not come yet gathers what arrives meanwhile into one write.
        Scheduled again while a pass that spans slices still holds it, a
        subscriber is flushed twice; the second flush finds nothing queued
        (`Connection.push` schedules only when its outbox was empty).
        """
        if not self._flush_scheduled:
            self._schedule_pass()
        self._dirty[subscriber] = None

    def _schedule_pass(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._flush_scheduled = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        # The rest of the last slice go first, then whoever was scheduled meanwhile.
        passes, self._left = self._left, []
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            passes.append(iter(dirty))
        self._write(passes)
        if self._delivered:
            DELIVERED.inc(self._delivered)
            self._delivered = 0

    def _write(self, passes: list[Iterator[Subscriber]]) -> None:
        """Flush the subscribers of ``passes`` in order for a slice; keep the rest for later."""
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + _FLUSH_SLICE
        count = 0
        for index, subscribers in enumerate(passes):
            for subscriber in subscribers:
                try:
                    subscriber.flush()
                except Exception:
                    # The others must still be written: a subscriber left out would wait
                    # for good, since it counts as scheduled until its flush runs.
                    logger.exception("flushing a connection failed")
                count += 1
                if count % _CLOCK_EVERY == 0 and loop.time() > deadline:
                    self._left = passes[index:]
                    if not self._flush_scheduled:
                        self._schedule_pass()
                    return
