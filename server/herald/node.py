"""The node: owns the engine and the hub, and does what HTTP and WebSocket ask.

It holds one worker's parts — identity, channels, publishing
(`herald.publishing`), live subscriptions (`herald.subscriptions`), devices and
commands — and routes the engine's control events to them. Channel and
subscribe permissions are checked here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from herald.auth import Principal, can_edit, can_read, require_scope
from herald.cache import ChannelCache
from herald.channels import update_channel
from herald.commands import Commands
from herald.config import Settings
from herald.devices import Devices
from herald.engines.base import Engine
from herald.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    HeraldError,
    NotFound,
)
from herald.hub import Hub
from herald.identity import Identity, install_bootstrap_key
from herald.models import Channel, Message, Topic, parse_offset
from herald.protocol import ResumePoint, Subscribe, Unsubscribe
from herald.publishing import Publisher
from herald.subscriptions import Client, Subscriptions

__all__ = ["Client", "Node", "subscriber_id", "subscription_target"]

logger = logging.getLogger("herald.node")


def subscriber_id(principal: Principal) -> str:
    """How persistent subscriptions name a subscriber: ``user:<id>`` or ``device:<id>``."""
    return f"{principal.kind}:{principal.id}"


def subscription_target(topic: Topic) -> str:
    """What a persistent subscription names: the channel, or ``channel|room``."""
    return f"{topic.channel}|{topic.room}" if topic.room else topic.channel


class Node:
    """One worker's Herald: engine + hub + the operations on them."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.hub = Hub()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.subscriptions = Subscriptions(settings, engine, self.hub)
        self._channels = ChannelCache(engine.get_channel)
        self.identity = Identity(engine)
        self.devices = Devices(self)
        self.publisher = Publisher(settings, engine, self._channels, self.touch_idle)
        self.commands = Commands(self)
        self.clients: set[Any] = set()
        """Open WebSocket connections of this worker (for keepalive and shutdown)."""
        self._addresses: dict[str, int] = {}

    async def start(self) -> None:
        """Start the engine; install ``settings.admin_key`` as the bootstrap key if given."""
        await self.engine.start(self.hub.deliver, self._on_control)
        if self.settings.admin_key:
            await install_bootstrap_key(self.engine, self.settings.admin_key)

    def _on_control(self, event: dict[str, Any]) -> None:
        self.identity.on_control(event)
        self.devices.on_control(event)
        self.commands.on_control(event)
        kind = event.get("type")
        if kind == "resync":
            # Events may have been missed while the engine's link was down.
            self._channels.clear()
            self.subscriptions.forget_positions()
        if kind in ("channel_changed", "channel_closed"):
            app, name = str(event.get("app")), str(event.get("name"))
            self._channels.forget(app, name)
            if kind == "channel_closed":
                self.subscriptions.close_channel(app, name)

    def hold_address(self, address: str) -> bool:
        """Count one more connection from ``address``, unless it holds the most
        ``max_connections_per_ip`` allows already (then ``False``)."""
        held = self._addresses.get(address, 0)
        limit = self.settings.max_connections_per_ip
        if limit and held >= limit:
            return False
        self._addresses[address] = held + 1
        return True

    def release_address(self, address: str) -> None:
        """Count one connection from ``address`` less."""
        held = self._addresses.pop(address, 0) - 1
        if held > 0:
            self._addresses[address] = held

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
            await self.touch_idle(channel)
        if principal.is_user and channel.type == "default":
            # The owner follows what it made (App.net's rule): on its next connect too.
            await self.engine.add_subscription(channel.app, channel.name, subscriber_id(principal))
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
        await self.touch_idle(channel)
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

    async def touch_idle(self, channel: Channel) -> None:
        """Push back (or set) when an idle channel closes itself: it was just used."""
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
        local = self.subscriptions.connections(channel.app, channel.name)
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
            fields["you_subscribed"] = subscriber_id(principal) in subscribers
        return fields

    async def report_presence(self) -> None:
        """Tell the other workers how many connections this one holds per channel."""
        interval = self.settings.presence_interval
        reported: int | None = None  # the hub's version last reported in full
        while True:
            try:
                # A full report costs a field per channel: with 10,000 channels, some 20 ms
                # of this worker's loop every round. Unchanged counts are only kept fresh.
                version = self.hub.version
                ttl = 3 * interval
                if version != reported or not await self.engine.refresh_presence(self.name, ttl):
                    counts = {k: v for k, v in self.subscriptions.local_connections().items() if v}
                    await self.engine.report_presence(self.name, counts, ttl=ttl)
                    reported = version
            except HeraldError as exc:  # the engine is away: report again next round
                logger.warning("presence report skipped: %s", exc.detail)
            await asyncio.sleep(interval)

    # Messages

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
            topic, since=since, until=until, limit=limit, reverse=reverse, size=channel.history_size
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
        """Subscribe a connection (after the readers ACL, a ``subscriber_key`` or a
        persistent subscription allows it), replaying history after ``since`` first."""
        channel = await self._channels.get(principal.app, request.channel)
        if channel is None:
            raise NotFound("Not found")
        if not await self._may_subscribe(principal, channel, request):
            raise Forbidden(f"this credential may not read channel {channel.name!r}")
        if channel.is_inactive:
            raise Gone(f"channel {channel.name!r} is closed")
        topic = channel.topic(channel.check_room(request.room))
        if request.persist:
            if not (principal.is_user or principal.is_device):
                raise BadRequest("persist needs a user token or a device", path="persist")
            await self.engine.add_subscription(
                channel.app, subscription_target(topic), subscriber_id(principal)
            )
        await self.subscriptions.add(client, topic, request.id, request.since, request.epoch)

    async def _may_subscribe(
        self, principal: Principal, channel: Channel, request: Subscribe
    ) -> bool:
        if can_read(principal, channel):
            return True
        if request.subscriber_key is not None:
            holder = await self.authenticate(request.subscriber_key)
            if holder.app == channel.app and holder.holds("subscriber_key", channel):
                return True
        if principal.is_device:
            # A device added by an admin reads what it was added to: ACLs name users.
            topic = channel.topic(channel.check_room(request.room))
            targets = await self.engine.subscriptions(channel.app, subscriber_id(principal))
            return subscription_target(topic) in targets
        return False

    async def unsubscribe(self, client: Client, principal: Principal, request: Unsubscribe) -> None:
        """Stop a connection's subscription to one topic."""
        channel = await self._channels.get(principal.app, request.channel)
        if channel is None:
            raise NotFound("Not found")
        topic = channel.topic(channel.check_room(request.room))
        if request.persist and (principal.is_user or principal.is_device):
            await self.engine.remove_subscription(
                channel.app, subscription_target(topic), subscriber_id(principal)
            )
        if not await self.subscriptions.remove(client, topic):
            raise NotFound(f"not subscribed to {channel.name!r}", path="channel")
        client.send(
            {"op": "unsubscribed", "id": request.id, "channel": channel.name, "room": topic.room}
        )

    async def resume_subscriptions(
        self, client: Client, principal: Principal, resume: tuple[ResumePoint, ...] = ()
    ) -> None:
        """Subscribe a new connection of a user or device to every channel it
        persistently follows, recovering after the ids ``resume`` gives (from a
        ``connect`` frame) so a reconnecting client misses nothing.

        One that is closed or no longer readable is skipped; each success answers
        a ``subscribed`` frame without an ``id``.
        """
        points = {(p.channel, p.room or ""): p for p in resume}
        for target in await self.engine.subscriptions(principal.app, subscriber_id(principal)):
            channel, _, room = target.partition("|")
            point = points.get((channel, room))
            since, epoch = (point.since, point.epoch) if point else (None, None)
            request = Subscribe(None, channel, room or None, since, None, False, epoch)
            try:
                await self.subscribe(client, principal, request)
            except HeraldError as exc:
                logger.info("not resuming %s for %s: %s", target, principal.id, exc.detail)

    async def disconnect(self, client: Client) -> None:
        """Drop every subscription of a closed connection (and where its device is)."""
        await self.subscriptions.drop_client(client)
        await self.devices.disconnect(client)
