"""Publishing: validate, rate-limit and hand messages to the engine.

Publishes are checked against a cached channel record (the channel cache is
refreshed by control events on every worker) so the publish path costs the
engine one round trip, shared by a whole batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from herald.audience import parse_audience
from herald.auth import Principal, can_publish
from herald.cache import ChannelCache
from herald.channels import parse_metadata, payload_size
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
    TooManyRequests,
)
from herald.limits import RateLimiter
from herald.metrics import PUBLISHED
from herald.models import Channel, Message, check_name

__all__ = ["Publisher"]

_ITEM_FIELDS = {"channel", "payload", "room", "metadata", "audience"}
_IDEMPOTENCY_TTL = 600  # seconds a retry with the same Idempotency-Key gets the first answer
_PENDING = b"\x00pending"
# Seconds the in-flight marker outlives a worker that died holding it (a live one
# replaces or forgets it within a publish's time; the Redis pipeline gives up after 5 s).
# Longer would refuse every retry of that key for as long.
PENDING_TTL = 15


def _parse_item(
    item: Any, known: dict[str, Channel | None] | None = None
) -> tuple[str, Any, object, object, object]:
    """(channel, payload, room, metadata, audience) of a publish request object.

    A channel name that ``known`` maps to a record is a channel's, so valid already.
    """
    if not isinstance(item, dict):
        raise BadRequest("each item must be an object")
    # The common item, {channel, payload}, is told apart without a set comparison.
    if not (len(item) == 2 and "payload" in item and "channel" in item) and not (
        item.keys() <= _ITEM_FIELDS
    ):
        unknown = sorted(item.keys() - _ITEM_FIELDS)[0]
        raise BadRequest(f"unknown field {unknown!r}", path=unknown)
    if "payload" not in item:
        raise BadRequest("payload is required", path="payload")
    channel = item.get("channel")
    if known is None or type(channel) is not str or known.get(channel) is None:
        channel = check_name(channel, "channel")
    return channel, item["payload"], item.get("room"), item.get("metadata"), item.get("audience")


class Publisher:
    """The publish operations of one worker."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        channels: ChannelCache,
        touch_idle: Callable[[Channel], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self._channels = channels
        self._touch_idle = touch_idle
        self._rates = RateLimiter(settings.publish_rate) if settings.publish_rate else None

    async def publish(
        self,
        principal: Principal,
        name: str,
        *,
        payload: Any,
        room: object = None,
        metadata: object = None,
        audience: object = None,
    ) -> Message:
        """Validate, store in history and hand to the broker. Never waits for subscribers.

        With an ``audience``, only the device subscribers it selects receive it.
        """
        self._spend_rate(principal, 1)
        channel = await self._publishable(principal, name)
        message = self._message(principal.author, channel, payload, room, metadata, audience)
        stored = await self.engine.publish(channel, message)
        PUBLISHED.inc()
        if channel.idle_timeout:
            await self._touch_idle(channel)
        return stored

    def _spend_rate(self, principal: Principal, cost: int) -> None:
        if self._rates is None:
            return
        credential = f"{principal.app}|{principal.kind}|{principal.id}"
        wait = self._rates.take(credential, time.monotonic(), cost)
        if wait:
            raise TooManyRequests(
                f"this credential may publish {self._rates.rate:g} messages a second",
                retry_after=RateLimiter.retry_after(wait),
            )

    async def _publishable(self, principal: Principal, name: str) -> Channel:
        channel = self._channels.peek(principal.app, name)
        if channel is None:
            channel = await self._channels.get(principal.app, name)
        return self._check_publishable(principal, name, channel)

    @staticmethod
    def _check_publishable(principal: Principal, name: str, channel: Channel | None) -> Channel:
        if channel is None:
            raise NotFound("Not found")
        if not can_publish(principal, channel):
            raise Forbidden(f"this credential may not publish on channel {name!r}")
        if channel.is_inactive:
            raise Gone(f"channel {name!r} is closed")
        return channel

    def _message(
        self,
        author: dict[str, str],
        channel: Channel,
        payload: Any,
        room: object,
        metadata: object,
        audience: object,
    ) -> Message:
        room_name = channel.check_room(room)
        if payload_size(payload, "payload") > self.settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is larger than {self.settings.max_payload_bytes} bytes", path="payload"
            )
        # Positional, in field order (id, app, channel, room, payload, author, created_at,
        # metadata, audience): keywords cost more, and this runs for every message.
        return Message(
            "",
            channel.app,
            channel.name,
            room_name,
            payload,
            author,
            "",
            None if metadata is None else parse_metadata(metadata, self.settings),
            None if audience is None else parse_audience(audience),
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
        self._spend_rate(principal, len(items))
        results: list[Message | HeraldError | None] = []
        accepted: list[tuple[Channel, Message]] = []
        channels: dict[str, Channel | HeraldError] = {}
        # Read the batch's channels at once, not one round trip after another.
        cache, app = self._channels, principal.app
        names = [item.get("channel") for item in items if isinstance(item, dict)]
        records = cache.fresh(app, names)
        cold = [name for name, record in records.items() if record is None]
        failed: set[str] = set()
        idle: dict[str, Channel] = {}  # channels published to that close when idle
        # One author object for the batch's messages (nothing changes a message's author).
        author = principal.author
        if cold:
            loaded = await asyncio.gather(
                *(cache.get(app, name) for name in cold), return_exceptions=True
            )
            for name, record in zip(cold, loaded, strict=True):
                if isinstance(record, BaseException):
                    failed.add(name)
                else:
                    records[name] = record  # None: no such channel
        for item in items:
            try:
                name, payload, room, metadata, audience = _parse_item(item, records)
                channel = channels.get(name)
                if channel is None:
                    try:
                        record = records.get(name)
                        if name in failed:  # again, so that the error is this item's
                            record = await cache.get(app, name)
                        channel = self._check_publishable(principal, name, record)
                    except HeraldError as exc:
                        channel = exc
                    channels[name] = channel
                if isinstance(channel, HeraldError):
                    raise channel
                message = self._message(author, channel, payload, room, metadata, audience)
                if channel.idle_timeout:
                    idle[name] = channel
                accepted.append((channel, message))
                results.append(None)
            except HeraldError as exc:
                results.append(exc)
        messages = await self.engine.publish_many(accepted)
        PUBLISHED.inc(len(messages))
        stored = iter(messages)
        for channel in idle.values():
            await self._touch_idle(channel)
        return [next(stored) if result is None else result for result in results]

    async def publish_item(self, principal: Principal, item: Any) -> Message:
        """Validate one publish request object (as a batch item) and publish it."""
        channel, payload, room, metadata, audience = _parse_item(item)
        return await self.publish(
            principal, channel, payload=payload, room=room, metadata=metadata, audience=audience
        )

    async def publish_once(self, principal: Principal, item: Any, idempotency_key: str) -> Message:
        """`publish_item`, unless a request with this key from this caller was published
        in the last 10 minutes: then the first message, and nothing new is published."""
        if not 0 < len(idempotency_key) <= 255 or not idempotency_key.isprintable():
            raise BadRequest(
                "Idempotency-Key must be 1-255 printable characters", path="Idempotency-Key"
            )
        key = f"idem|{principal.app}|{principal.kind}|{principal.id}|{idempotency_key}"
        held = await self.engine.put_if_absent(key, _PENDING, PENDING_TTL)
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
