"""This worker's live subscriptions: which connection listens to which topic.

`Subscriptions` reference-counts the worker's topic subscriptions with the
engine (one engine subscription per topic, however many local listeners) and
merges history with live messages on subscribe, so a client sees every
message once, in order, whatever races its subscribe. Permission checks are
the caller's: everything here has been allowed already.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Protocol, cast

from herald.audience import visible
from herald.config import Settings
from herald.engines.base import Engine
from herald.errors import BadRequest, CloseCode, Conflict
from herald.hub import Hub, Subscriber, frame_bytes
from herald.metrics import RECOVERIES, SUBSCRIPTIONS, TOPICS
from herald.models import StreamPosition, Topic, offset_key
from herald.protocol import ConnectionState

__all__ = ["Client", "Subscriptions"]


class Client(Subscriber, Protocol):
    """A WebSocket connection as the node sees it."""

    state: ConnectionState
    client_id: str

    def send(self, frame: dict[str, Any]) -> None:
        """Encode and queue one server frame."""

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Flush what is queued and close the connection with ``code``."""


def _subscribed_frame(request_id: object, topic: Topic, offset: str, epoch: str) -> dict[str, Any]:
    return {
        "op": "subscribed",
        "id": request_id,
        "channel": topic.channel,
        "room": topic.room,
        "position": {"offset": offset, "epoch": epoch},
    }


class Subscriptions:
    """Topic → local listeners, and the engine subscriptions they need."""

    def __init__(self, settings: Settings, engine: Engine, hub: Hub) -> None:
        self.settings = settings
        self.engine = engine
        self.hub = hub
        self._refs: dict[Topic, int] = defaultdict(int)
        self._by_channel: dict[tuple[str, str], set[Topic]] = {}  # the keys of _refs
        self._engine_topics: set[Topic] = set()
        self._locks: dict[Topic, asyncio.Lock] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        # Where each topic stood when this worker read it last; with the hub's newest
        # delivered id it answers a subscribe without asking the engine again.
        self._positions: dict[Topic, StreamPosition] = {}

    def topics(self, app: str, channel: str) -> list[Topic]:
        """The topics (rooms) of a channel that this worker listens to."""
        return list(self._by_channel.get((app, channel), ()))

    def listeners(self, topic: Topic) -> Iterator[Client]:
        """The connections listening to ``topic`` (live or catching up)."""
        # The hub holds what `add` gave it: clients.
        return (cast(Client, s) for s in self.hub.listeners(topic))

    def local_connections(self) -> dict[str, int]:
        """``"app|channel"`` → connections of this worker subscribed to it."""
        return {
            f"{app}|{channel}": self.connections(app, channel) for app, channel in self._by_channel
        }

    def connections(self, app: str, channel: str) -> int:
        """Connections of this worker subscribed to a channel (any room)."""
        return sum(
            self.hub.subscribers(topic) for topic in self._by_channel.get((app, channel), ())
        )

    async def add(
        self,
        client: Client,
        topic: Topic,
        request_id: object,
        since: str | None = None,
        epoch: str | None = None,
    ) -> None:
        """Subscribe a connection, replaying history after ``since`` first.

        Live messages that arrive while history is read are buffered in the hub
        and merged by id, so the client gets no gap and no duplicate. Messages
        with an audience reach only the devices they select, replayed ones too.
        """
        if topic in client.state.topics:
            # Idempotent (a connection may have been subscribed on connect), but
            # a replay cannot be spliced into a live subscription.
            if since is not None:
                raise Conflict(f"already subscribed to {topic.channel!r}", path="channel")
            position = await self._position(topic)
            client.send(_subscribed_frame(request_id, topic, position.offset, position.epoch))
            return
        if len(client.state.topics) >= self.settings.max_subscriptions:
            raise BadRequest(
                f"a connection holds at most {self.settings.max_subscriptions} subscriptions",
                code="too_many_subscriptions",
            )
        client.state.topics.add(topic)
        SUBSCRIPTIONS.inc()
        self.hub.begin(topic, client)
        try:
            await self._acquire(topic)
            if since is not None:
                recovery = await self.engine.recover(topic, since, epoch)
                replay, recovered, position = (
                    recovery.messages,
                    recovery.recovered,
                    recovery.position,
                )
            else:
                replay, recovered, position = [], None, await self._position(topic)
        except BaseException:
            self.hub.remove(topic, client)
            client.state.topics.discard(topic)
            SUBSCRIPTIONS.dec()
            await self._release(topic)
            raise
        answer = _subscribed_frame(request_id, topic, position.offset, position.epoch)
        if recovered is not None:
            answer["recovered"] = recovered
            RECOVERIES.labels(recovered="true" if recovered else "false").inc()
        client.send(answer)
        device, encoding = client.device, client.state.encoding
        # position was read with the replay: anything buffered past it is new.
        for message in [*replay, *self.hub.activate(topic, client, position.offset)]:
            if visible(message.audience, device):
                client.push(frame_bytes(message, encoding))

    async def _position(self, topic: Topic) -> StreamPosition:
        """The topic's newest id and epoch, from this worker's own state when it has
        listened to the topic since it last read them.

        Any id not newer than the truth will do: everything after it reaches the
        new subscriber live, since the topic stays subscribed with the engine.
        """
        known = self._positions.get(topic)
        if known is None:
            position = await self.engine.position(topic)
            if topic in self._engine_topics:
                self._positions[topic] = position
            return position
        last = self.hub.last_id(topic)
        if last is not None and offset_key(last) > offset_key(known.offset):
            known = self._positions[topic] = StreamPosition(last, known.epoch)
        return known

    def forget_positions(self) -> None:
        """Read positions from the engine again (after its link was lost: the history
        may have been too)."""
        self._positions.clear()

    async def remove(self, client: Client, topic: Topic) -> bool:
        """Stop a connection's subscription to ``topic``; ``False`` if it had none."""
        if topic not in client.state.topics:
            return False
        client.state.topics.discard(topic)
        SUBSCRIPTIONS.dec()
        self.hub.remove(topic, client)
        await self._release(topic)
        return True

    async def drop_client(self, client: Client) -> None:
        """Drop every subscription of a closed connection."""
        topics, client.state.topics = client.state.topics, set()
        SUBSCRIPTIONS.dec(len(topics))
        for topic in topics:
            self.hub.remove(topic, client)
        for topic in topics:
            await self._release(topic)

    def close_channel(self, app: str, name: str) -> None:
        """Tell this worker's subscribers of a closed channel, and unsubscribe them."""
        for topic in self.topics(app, name):
            frame = {"op": "closed", "channel": name, "room": topic.room}
            for subscriber in self.hub.drop(topic):
                client = cast(Client, subscriber)
                client.send(frame)
                if topic in client.state.topics:
                    client.state.topics.discard(topic)
                    SUBSCRIPTIONS.dec()
                    self.spawn(self._release(topic))

    def spawn(self, work: Any) -> None:
        """Run a coroutine in the background, keeping a reference until it is done."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lock(self, topic: Topic) -> asyncio.Lock:
        lock = self._locks.get(topic)
        if lock is None:
            lock = self._locks[topic] = asyncio.Lock()
        return lock

    async def _acquire(self, topic: Topic) -> None:
        self._refs[topic] += 1
        self._by_channel.setdefault((topic.app, topic.channel), set()).add(topic)
        if topic in self._engine_topics:
            return
        async with self._lock(topic):
            if topic not in self._engine_topics and self._refs.get(topic, 0) > 0:
                await self.engine.subscribe(topic)
                self._engine_topics.add(topic)
                TOPICS.inc()

    async def _release(self, topic: Topic) -> None:
        self._refs[topic] -= 1
        if self._refs[topic] > 0:
            return
        del self._refs[topic]
        rooms = self._by_channel.get((topic.app, topic.channel), set())
        rooms.discard(topic)
        if not rooms:
            self._by_channel.pop((topic.app, topic.channel), None)
        lock = self._lock(topic)
        async with lock:
            # Re-check under the lock: a subscribe may have come back meanwhile.
            if self._refs.get(topic, 0) == 0 and topic in self._engine_topics:
                # Leave the set first, so a concurrent subscribe waits for the lock
                # and resubscribes after this unsubscribe, not before.
                self._engine_topics.discard(topic)
                TOPICS.dec()
                self._positions.pop(topic, None)
                await self.engine.unsubscribe(topic)
        if self._refs.get(topic, 0) == 0 and not lock.locked():
            self._locks.pop(topic, None)
