"""The node: owns the engine and the hub, and does what HTTP and WebSocket ask.

It reference-counts this worker's topic subscriptions with the engine and
merges history with live messages on subscribe, so a client sees every
message once, in order, whatever races its subscribe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from typing import Any, Protocol, cast

import msgpack

from herald.auth import Principal, can_edit, can_publish, can_read, require_scope
from herald.cache import ChannelCache
from herald.channels import parse_metadata, payload_size, update_channel
from herald.config import Settings
from herald.engines.base import Engine
from herald.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    HeraldError,
    NotFound,
    PayloadTooLarge,
)
from herald.hub import Hub, Subscriber, frame_bytes
from herald.identity import Identity, install_bootstrap_key
from herald.models import Channel, Message, Topic, check_name, parse_offset
from herald.protocol import ConnectionState, Subscribe, Unsubscribe

__all__ = ["Client", "Node"]

logger = logging.getLogger("herald.node")

_ITEM_FIELDS = {"channel", "payload", "room", "metadata", "audience"}
_IDEMPOTENCY_TTL = 600  # seconds a retry with the same Idempotency-Key gets the first answer
_PENDING = b"\x00pending"


def _parse_item(item: Any) -> tuple[str, Any, object, object]:
    """(channel, payload, room, metadata) of a publish request object."""
    if not isinstance(item, dict):
        raise BadRequest("each item must be an object")
    if not item.keys() <= _ITEM_FIELDS:
        unknown = sorted(item.keys() - _ITEM_FIELDS)[0]
        raise BadRequest(f"unknown field {unknown!r}", path=unknown)
    if "payload" not in item:
        raise BadRequest("payload is required", path="payload")
    if item.get("audience") is not None:
        raise BadRequest(
            "audience targets devices, which this version does not have yet", path="audience"
        )
    channel = check_name(item.get("channel"), "channel")
    return channel, item["payload"], item.get("room"), item.get("metadata")


def _subscriber_id(principal: Principal) -> str:
    return f"{principal.kind}:{principal.id}"


def _target(topic: Topic) -> str:
    """What a persistent subscription names: the channel, or ``channel|room``."""
    return f"{topic.channel}|{topic.room}" if topic.room else topic.channel


class Client(Subscriber, Protocol):
    """A WebSocket connection as the node sees it."""

    state: ConnectionState

    def send(self, frame: dict[str, Any]) -> None:
        """Encode and queue one server frame."""


class Node:
    """One worker's Herald: engine + hub + the operations on them."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.hub = Hub()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._refs: dict[Topic, int] = defaultdict(int)
        self._engine_topics: set[Topic] = set()
        self._locks: dict[Topic, asyncio.Lock] = {}
        self._channels = ChannelCache(engine.get_channel)
        self.identity = Identity(engine)
        self._tasks: set[asyncio.Future[None]] = set()
        self.clients: set[Any] = set()
        """Open WebSocket connections of this worker (for keepalive and shutdown)."""

    async def start(self) -> None:
        """Start the engine; install ``settings.admin_key`` as the bootstrap key if given."""
        await self.engine.start(self.hub.deliver, self._on_control)
        if self.settings.admin_key:
            await install_bootstrap_key(self.engine, self.settings.admin_key)

    def _on_control(self, event: dict[str, Any]) -> None:
        self.identity.on_control(event)
        kind = event.get("type")
        if kind == "resync":
            # Events may have been missed while the engine's link was down.
            self._channels.clear()
        if kind in ("channel_changed", "channel_closed"):
            app, name = str(event.get("app")), str(event.get("name"))
            self._channels.forget(app, name)
            if kind == "channel_closed":
                self._close_locally(app, name)

    def _close_locally(self, app: str, name: str) -> None:
        """Tell this worker's subscribers of a closed channel, and unsubscribe them."""
        for topic in [t for t in self._refs if t.app == app and t.channel == name]:
            frame = {"op": "closed", "channel": name, "room": topic.room}
            for subscriber in self.hub.drop(topic):
                # The hub holds what `subscribe` gave it: clients.
                client = cast(Client, subscriber)
                client.send(frame)
                if topic in client.state.topics:
                    client.state.topics.discard(topic)
                    task = asyncio.ensure_future(self._release(topic))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Release the engine."""
        await self.engine.close()

    # Identity

    async def authenticate(self, credential: str) -> Principal:
        """The principal behind an app key or a user token; `Unauthorized` otherwise."""
        return await self.identity.authenticate(credential)

    # Channels

    async def create_channel(
        self, principal: Principal, channel: Channel
    ) -> tuple[Channel, dict[str, str]]:
        """Store a new channel of the principal's app, and make its keys (shown once).

        Admin keys and users may create channels; the creator is the owner.
        `Conflict` if the name is taken.
        """
        if not principal.is_user:
            require_scope(principal, "admin")
        channel.owner = principal.author
        if not await self.engine.create_channel(channel):
            raise Conflict(f"channel {channel.name!r} exists already", path="name")
        if channel.idle_timeout:
            await self._touch_idle(channel)
        if principal.is_user and channel.type == "default":
            # The owner follows what it made (App.net's rule): on its next connect too.
            await self.engine.add_subscription(channel.app, channel.name, _subscriber_id(principal))
        return channel, await self.identity.channel_keys(channel)

    async def channel(self, principal: Principal, name: str, *, cached: bool = False) -> Channel:
        """A channel of the principal's app, or `NotFound`; users must be able to read it.

        ``cached`` reads through the channel cache (settings only: counts may lag);
        edits always start from the stored record.
        """
        if cached:
            channel = await self._channels.get(principal.app, name)
        else:
            channel = await self.engine.get_channel(principal.app, name)
        if channel is None:
            raise NotFound("Not found")
        if (principal.is_user or principal.channel) and not (
            can_read(principal, channel) or can_edit(principal, channel)
        ):
            raise Forbidden(f"this credential may not read channel {name!r}")
        return channel

    async def readable(self, principal: Principal, name: str) -> Channel:
        """A channel the principal may subscribe to and read the history of."""
        channel = await self.channel(principal, name, cached=True)
        if not can_read(principal, channel):
            raise Forbidden(f"this credential may not read channel {name!r}")
        return channel

    async def update_channel(self, principal: Principal, name: str, body: object) -> Channel:
        """Change a channel's settings (owner, editors, admin keys); every worker sees it."""
        channel = await self.channel(principal, name)
        if not can_edit(principal, channel):
            raise Forbidden(f"this credential may not edit channel {name!r}")
        if channel.is_inactive:
            raise Gone(f"channel {name!r} is closed")
        update_channel(channel, body, self.settings)
        await self.engine.save_channel(channel)
        await self._touch_idle(channel)
        self._channels.forget(channel.app, name)  # here at once; elsewhere by the event
        await self.engine.broadcast({"type": "channel_changed", "app": channel.app, "name": name})
        return channel

    async def close_channel(self, principal: Principal, name: str) -> Channel:
        """Close a channel for good: no publishes, no new subscribers; live ones are told.

        Idempotent: closing a closed channel answers it again.
        """
        channel = await self.channel(principal, name)
        if not can_edit(principal, channel):
            raise Forbidden(f"this credential may not close channel {name!r}")
        await self._close(channel)
        return channel

    async def _close(self, channel: Channel) -> None:
        if channel.is_inactive:
            return
        channel.is_inactive = True
        await self.engine.save_channel(channel)
        await self.engine.touch_idle(channel.app, channel.name, None)
        await self.engine.drop_subscribers(channel.app, channel.name)
        self._channels.forget(channel.app, channel.name)  # here at once; elsewhere by the event
        await self.engine.broadcast(
            {"type": "channel_closed", "app": channel.app, "name": channel.name}
        )

    async def sweep_idle(self) -> None:
        """Close channels that went ``idle_timeout`` seconds without a publish.

        Runs on every worker; the engine hands each due channel to one of them.
        """
        while True:
            await asyncio.sleep(self.settings.idle_sweep_interval)
            try:
                for app, name in await self.engine.claim_idle(time.time()):
                    channel = await self.engine.get_channel(app, name)
                    if channel is not None:
                        logger.info("closing channel %s/%s: idle", app, name)
                        await self._close(channel)
            except HeraldError as exc:  # the engine is away: try again next round
                logger.warning("idle sweep skipped: %s", exc.detail)

    async def _touch_idle(self, channel: Channel) -> None:
        deadline = time.time() + channel.idle_timeout if channel.idle_timeout else None
        await self.engine.touch_idle(channel.app, channel.name, deadline)

    async def list_channels(
        self,
        principal: Principal,
        *,
        after: str | None,
        limit: int,
        include_inactive: bool,
        kind: str | None,
    ) -> tuple[list[Channel], str | None]:
        """One page of channels and the cursor of the next page (``None`` at the end)."""
        found: list[Channel] = []
        cursor = after
        while len(found) < limit:
            batch = await self.engine.list_channels(principal.app, after=cursor, limit=limit)
            for channel in batch:
                if (
                    (include_inactive or not channel.is_inactive)
                    and kind in (None, channel.type)
                    and (
                        not (principal.is_user or principal.channel) or can_read(principal, channel)
                    )
                ):
                    found.append(channel)
                    if len(found) == limit:
                        break
                cursor = channel.name
            if len(batch) < limit:
                return found, None
        return found, found[-1].name if found else None

    async def live_fields(self, channel: Channel, principal: Principal) -> dict[str, Any]:
        """``counts`` (messages stored, persistent subscribers, live connections: this
        worker's exactly, the others' as of their last report), and for users
        ``you_can_edit`` and ``you_subscribed``."""
        local = self._local_connections().get(f"{channel.app}|{channel.name}", 0)
        others = await self.engine.presence(channel.app, channel.name, exclude=self.name)
        subscribers = await self.engine.subscribers(channel.app, channel.name)
        fields: dict[str, Any] = {
            "counts": {
                "messages": channel.messages,
                "subscribers": len(subscribers),
                "connections": local + others,
            }
        }
        if principal.is_user:
            fields["you_can_edit"] = can_edit(principal, channel)
            fields["you_subscribed"] = _subscriber_id(principal) in subscribers
        return fields

    async def resume_subscriptions(self, client: Client, principal: Principal) -> None:
        """Subscribe a user's new connection to every channel it persistently follows.

        One that is closed or no longer readable is skipped; each success answers
        a ``subscribed`` frame without an ``id``.
        """
        for target in await self.engine.subscriptions(principal.app, _subscriber_id(principal)):
            channel, _, room = target.partition("|")
            request = Subscribe(None, channel, room or None, None, None, False)
            try:
                await self.subscribe(client, principal, request)
            except HeraldError as exc:
                logger.info("not resuming %s for %s: %s", target, principal.id, exc.detail)

    def _local_connections(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for topic in self._refs:
            counts[f"{topic.app}|{topic.channel}"] += self.hub.subscribers(topic)
        return counts

    async def report_presence(self) -> None:
        """Tell the other workers how many connections this one holds per channel."""
        interval = self.settings.presence_interval
        while True:
            try:
                counts = {k: v for k, v in self._local_connections().items() if v}
                await self.engine.report_presence(self.name, counts, ttl=3 * interval)
            except HeraldError as exc:  # the engine is away: report again next round
                logger.warning("presence report skipped: %s", exc.detail)
            await asyncio.sleep(interval)

    # Messages

    async def publish(
        self,
        principal: Principal,
        name: str,
        *,
        payload: Any,
        room: object = None,
        metadata: object = None,
    ) -> Message:
        """Validate, store in history and hand to the broker. Never waits for subscribers."""
        channel, message = await self._prepare(principal, name, payload, room, metadata)
        stored = await self.engine.publish(channel, message)
        if channel.idle_timeout:
            await self._touch_idle(channel)
        return stored

    async def _prepare(
        self, principal: Principal, name: str, payload: Any, room: object, metadata: object
    ) -> tuple[Channel, Message]:
        """The channel and the message to store, or the error that stops the publish."""
        channel = await self._publishable(principal, name)
        return channel, self._message(principal, channel, payload, room, metadata)

    async def _publishable(self, principal: Principal, name: str) -> Channel:
        channel = await self._channels.get(principal.app, name)
        if channel is None:
            raise NotFound("Not found")
        if not can_publish(principal, channel):
            raise Forbidden(f"this credential may not publish on channel {name!r}")
        if channel.is_inactive:
            raise Gone(f"channel {name!r} is closed")
        return channel

    def _message(
        self, principal: Principal, channel: Channel, payload: Any, room: object, metadata: object
    ) -> Message:
        room_name = channel.check_room(room)
        if payload_size(payload, "payload") > self.settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is larger than {self.settings.max_payload_bytes} bytes", path="payload"
            )
        return Message(
            id="",
            app=channel.app,
            channel=channel.name,
            room=room_name,
            payload=payload,
            author=principal.author,
            created_at="",
            metadata=parse_metadata(metadata, self.settings),
        )

    async def publish_many(
        self, principal: Principal, items: list[Any]
    ) -> list[Message | HeraldError]:
        """Publish each item (``{channel, payload, room?, metadata?}``); one result per item.

        Valid items are handed to the engine together, in list order: publishes
        to one topic keep the order of the list, and with Redis they share one
        round trip. A failing item does not stop the others. Each channel is
        looked up and checked once per batch.
        """
        results: list[Message | HeraldError | None] = []
        accepted: list[tuple[Channel, Message]] = []
        channels: dict[str, Channel | HeraldError] = {}
        # Read the batch's channels at once, not one round trip after another.
        names = {item.get("channel") for item in items if isinstance(item, dict)}
        cold = self._channels.missing(principal.app, {n for n in names if isinstance(n, str)})
        if cold:
            await asyncio.gather(
                *(self._channels.get(principal.app, name) for name in cold),
                return_exceptions=True,
            )
        for item in items:
            try:
                name, payload, room, metadata = _parse_item(item)
                channel = channels.get(name)
                if channel is None:
                    try:
                        channel = await self._publishable(principal, name)
                    except HeraldError as exc:
                        channel = exc
                    channels[name] = channel
                if isinstance(channel, HeraldError):
                    raise channel
                accepted.append(
                    (channel, self._message(principal, channel, payload, room, metadata))
                )
                results.append(None)
            except HeraldError as exc:
                results.append(exc)
        stored = iter(await self.engine.publish_many(accepted))
        for channel in {c.name: c for c, _ in accepted if c.idle_timeout}.values():
            await self._touch_idle(channel)
        return [next(stored) if result is None else result for result in results]

    async def publish_item(self, principal: Principal, item: Any) -> Message:
        """Validate one publish request object (as a batch item) and publish it."""
        channel, payload, room, metadata = _parse_item(item)
        return await self.publish(principal, channel, payload=payload, room=room, metadata=metadata)

    async def publish_once(self, principal: Principal, item: Any, idempotency_key: str) -> Message:
        """`publish_item`, unless a request with this key from this caller was published
        in the last 10 minutes: then the first message, and nothing new is published."""
        if not 0 < len(idempotency_key) <= 255 or not idempotency_key.isprintable():
            raise BadRequest(
                "Idempotency-Key must be 1-255 printable characters", path="Idempotency-Key"
            )
        key = f"idem|{principal.app}|{principal.kind}|{principal.id}|{idempotency_key}"
        held = await self.engine.put_if_absent(key, _PENDING, _IDEMPOTENCY_TTL)
        if held == _PENDING:
            raise Conflict("a request with this Idempotency-Key is still in progress")
        if held is not None:
            return Message.from_record(msgpack.unpackb(held, raw=False))
        try:
            message = await self.publish_item(principal, item)
        except BaseException:
            await self.engine.forget(key)  # it failed: a retry may try again
            raise
        record = msgpack.packb(message.to_record(), use_bin_type=True)
        await self.engine.put(key, record, _IDEMPOTENCY_TTL)
        return message

    async def history(
        self,
        principal: Principal,
        name: str,
        *,
        room: object,
        since: str | None,
        until: str | None,
        limit: int,
        reverse: bool,
    ) -> list[Message]:
        """Retained messages of one topic of a channel."""
        channel = await self.readable(principal, name)
        topic = channel.topic(channel.check_room(room))
        return await self.engine.history(
            topic, since=since, until=until, limit=limit, reverse=reverse
        )

    async def message(
        self, principal: Principal, name: str, message_id: str, room: object
    ) -> Message:
        """One retained message by id, or `NotFound`."""
        channel = await self.readable(principal, name)
        topic = channel.topic(channel.check_room(room))
        ms, seq = parse_offset(message_id, "id")
        # The newest message before the id right after this one is this one, if it exists.
        found = await self.engine.history(topic, until=f"{ms}-{seq + 1}", limit=1, reverse=True)
        if not found or found[0].id != message_id:
            raise NotFound("Not found")
        return found[0]

    # Subscriptions

    async def subscribe(self, client: Client, principal: Principal, request: Subscribe) -> None:
        """Subscribe a connection, replaying history after ``request.since`` first.

        Live messages that arrive while history is read are buffered in the hub
        and merged by id, so the client gets no gap and no duplicate.
        """
        channel = await self.readable(principal, request.channel)
        if channel.is_inactive:
            raise Gone(f"channel {channel.name!r} is closed")
        topic = channel.topic(channel.check_room(request.room))
        if request.persist:
            if not principal.is_user:
                raise BadRequest("persist needs a user token", path="persist")
            await self.engine.add_subscription(
                channel.app, _target(topic), _subscriber_id(principal)
            )
        if topic in client.state.topics:
            # Idempotent (a user's connection may have been subscribed on connect), but
            # a replay cannot be spliced into a live subscription.
            if request.since is not None:
                raise Conflict(f"already subscribed to {channel.name!r}", path="channel")
            position = await self.engine.position(topic)
            client.send(
                {
                    "op": "subscribed",
                    "id": request.id,
                    "channel": channel.name,
                    "room": topic.room,
                    "position": {"offset": position.offset, "epoch": position.epoch},
                }
            )
            return
        if len(client.state.topics) >= self.settings.max_subscriptions:
            raise BadRequest(
                f"a connection holds at most {self.settings.max_subscriptions} subscriptions",
                code="too_many_subscriptions",
            )
        client.state.topics.add(topic)
        self.hub.begin(topic, client)
        try:
            await self._acquire(topic)
            if request.since is not None:
                recovery = await self.engine.recover(topic, request.since, request.epoch)
                replay, recovered, position = (
                    recovery.messages,
                    recovery.recovered,
                    recovery.position,
                )
            else:
                replay, recovered, position = [], None, await self.engine.position(topic)
        except BaseException:
            self.hub.remove(topic, client)
            client.state.topics.discard(topic)
            await self._release(topic)
            raise
        answer: dict[str, Any] = {
            "op": "subscribed",
            "id": request.id,
            "channel": channel.name,
            "room": topic.room,
            "position": {"offset": position.offset, "epoch": position.epoch},
        }
        if recovered is not None:
            answer["recovered"] = recovered
        client.send(answer)
        for message in replay:
            client.push(frame_bytes(message, client.state.encoding))
        # position was read with the replay: anything buffered past it is new.
        for message in self.hub.activate(topic, client, position.offset):
            client.push(frame_bytes(message, client.state.encoding))

    async def unsubscribe(self, client: Client, principal: Principal, request: Unsubscribe) -> None:
        """Stop a connection's subscription to one topic."""
        channel = await self.channel(principal, request.channel)
        topic = channel.topic(channel.check_room(request.room))
        if request.persist and principal.is_user:
            await self.engine.remove_subscription(
                channel.app, _target(topic), _subscriber_id(principal)
            )
        if topic not in client.state.topics:
            raise NotFound(f"not subscribed to {channel.name!r}", path="channel")
        client.state.topics.discard(topic)
        self.hub.remove(topic, client)
        client.send(
            {"op": "unsubscribed", "id": request.id, "channel": channel.name, "room": topic.room}
        )
        await self._release(topic)

    async def disconnect(self, client: Client) -> None:
        """Drop every subscription of a closed connection."""
        topics, client.state.topics = client.state.topics, set()
        for topic in topics:
            self.hub.remove(topic, client)
        for topic in topics:
            await self._release(topic)

    def _lock(self, topic: Topic) -> asyncio.Lock:
        lock = self._locks.get(topic)
        if lock is None:
            lock = self._locks[topic] = asyncio.Lock()
        return lock

    async def _acquire(self, topic: Topic) -> None:
        self._refs[topic] += 1
        if topic in self._engine_topics:
            return
        async with self._lock(topic):
            if topic not in self._engine_topics and self._refs.get(topic, 0) > 0:
                await self.engine.subscribe(topic)
                self._engine_topics.add(topic)

    async def _release(self, topic: Topic) -> None:
        self._refs[topic] -= 1
        if self._refs[topic] > 0:
            return
        del self._refs[topic]
        lock = self._lock(topic)
        async with lock:
            # Re-check under the lock: a subscribe may have come back meanwhile.
            if self._refs.get(topic, 0) == 0 and topic in self._engine_topics:
                # Leave the set first, so a concurrent subscribe waits for the lock
                # and resubscribes after this unsubscribe, not before.
                self._engine_topics.discard(topic)
                await self.engine.unsubscribe(topic)
        if self._refs.get(topic, 0) == 0 and not lock.locked():
            self._locks.pop(topic, None)
