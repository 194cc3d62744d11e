"""Every subscription of a client, and how each is subscribed on a link.

A subscription is sent at most once per link (its ``generation`` marks the
link it went out on, set before anything awaits), is live on a link only
once that link answered it, and resumes from its cursor.

Persistent subscriptions (devices, users) are subscribed by the server itself
on ``connect``; the client names its cursor for each in ``connect``'s
``resume``, so the server recovers them there. One the server subscribed
without recovering (a server that predates ``resume``) is taken as it is when
nothing was missed, and otherwise unsubscribed and subscribed again with
``since``: the server refuses ``since`` over a live subscription.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from herald.client.errors import ClientError, RequestError
from herald.client.frames import Frame, Position, TopicKey, id_key
from herald.client.link import Link
from herald.client.subscription import Subscription

if TYPE_CHECKING:
    import asyncio

    from herald.client.connection import Client

__all__ = ["Topics"]

logger = logging.getLogger("herald.client")


def _topic(sub: Subscription) -> Frame:
    topic: Frame = {"channel": sub.channel}
    if sub.room:
        topic["room"] = sub.room
    return topic


class Topics:
    """The subscriptions of one client, by ``(channel, room)``."""

    def __init__(
        self,
        client: Client,
        current: Callable[[], Link | None],
        spawn: Callable[[Awaitable[Any]], asyncio.Future[Any]],
        max_buffer: int,
    ) -> None:
        self._client = client
        self._current = current
        self._spawn = spawn
        self._max_buffer = max_buffer
        self._subs: dict[TopicKey, Subscription] = {}

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subs.values()))

    def get(self, key: TopicKey) -> Subscription | None:
        """The subscription to a topic, if any."""
        return self._subs.get(key)

    def add(self, sub: Subscription) -> None:
        """Track ``sub`` and subscribe it as soon as a link is ready."""
        self._subs[sub.key] = sub
        self.subscribe_now(sub)

    def live(self, link: Link, key: TopicKey) -> Subscription | None:
        """The subscription that takes a topic's messages on ``link``, if one does."""
        sub = self._subs.get(key)
        if sub is not None and sub.live and sub.generation == link.generation:
            return sub
        return None

    def subscribe_now(
        self, sub: Subscription, *, unsubscribe_first: bool = False
    ) -> asyncio.Future[Any] | None:
        """Send ``sub``'s subscribe on the current link if it is ready (else the next
        link's `resume` will). Marked before anything awaits, so nobody sends it
        twice on one link."""
        link = self._current()
        if link is None or not link.ready:
            sub.generation = -1
            return None
        sub.generation, sub.live = link.generation, False
        return self._spawn(self._subscribe_on(link, sub, unsubscribe_first))

    async def _subscribe_on(self, link: Link, sub: Subscription, unsubscribe_first: bool) -> None:
        frame: Frame = {"op": "subscribe", **_topic(sub)}
        if sub.last_id is not None:
            frame["since"] = sub.last_id
            if sub.epoch:
                frame["epoch"] = sub.epoch
        if sub.subscriber_key is not None:
            frame["subscriber_key"] = sub.subscriber_key
        if sub.persist_pending:
            frame["persist"] = True
        generation = link.generation
        try:
            for attempt in (1, 2):
                if unsubscribe_first:
                    # Messages of the server's own subscription that arrive meanwhile
                    # are dropped (not live): the replay after `since` brings them back.
                    with contextlib.suppress(RequestError):
                        await link.request({"op": "unsubscribe", **_topic(sub)})
                try:
                    await link.request(frame, lambda answer: sub.answered(answer, generation))
                    break
                except RequestError as exc:
                    if exc.code != "conflict" or attempt == 2:
                        raise
                    unsubscribe_first = True  # an admin subscribed it meanwhile
            sub.persist_pending = False
        except RequestError as exc:
            logger.warning("subscription to %s refused: %s", sub.channel, exc)
            self.forget(sub, str(exc), exc)
        except ClientError:
            pass  # the link ended: the next one subscribes again

    def resume_points(self, link: Link, limit: int = 1000) -> list[Frame]:
        """``connect``'s ``resume``: where each subscription the server has answered
        before stands (its fields were validated then: a bad one would fail the
        ``connect`` itself), remembered on ``link``."""
        points: list[Frame] = []
        for sub in self:
            since = sub.last_id
            if sub.position is None or since is None or id_key(since) is None:
                continue
            point: Frame = {**_topic(sub), "since": since}
            if sub.epoch:
                point["epoch"] = sub.epoch
            points.append(point)
            link.resumed_from[sub.key] = since
            if len(points) == limit:
                break
        return points

    async def resume(self, link: Link) -> None:
        """Subscribe every topic not live on ``link`` yet, from its cursor, and wait
        until each is answered (or refused, or the link ends)."""
        started = [
            self.subscribe_now(sub, unsubscribe_first=sub.key in link.unrecovered)
            for sub in self
            if sub.generation != link.generation
        ]
        for task in started:
            if task is not None:
                await task

    def server_subscribed(self, link: Link, frame: Frame) -> None:
        """A ``subscribed`` nobody asked for: the server subscribed this device or user
        to a persistent subscription (on connect, or because an admin added one)."""
        key = (str(frame.get("channel")), str(frame.get("room") or ""))
        sub = self._subs.get(key)
        if sub is None:
            sub = Subscription(self._client, *key, persistent=True, max_buffer=self._max_buffer)
            self._subs[key] = sub
            sub.answered(frame, link.generation)
            return
        if sub.generation == link.generation:
            return  # live here already, or our own subscribe is on its way
        if "recovered" in frame and link.resumed_from.get(key) == sub.last_id:
            # Recovered from the point `connect` named: the replay follows this frame.
            sub.answered(frame, link.generation)
            return
        position = Position.from_frame(frame)
        if sub.last_id is None or (
            position.offset == sub.last_id and sub.epoch in (None, position.epoch)
        ):
            sub.answered(frame, link.generation)  # nothing was missed: take it as it is
        elif link.ready:
            self.subscribe_now(sub, unsubscribe_first=True)
        else:
            link.unrecovered[key] = frame  # `resume` recovers it from the cursor

    def forget(
        self,
        sub: Subscription,
        reason: str,
        error: BaseException | None = None,
        *,
        notify: bool = True,
    ) -> None:
        """End ``sub`` and stop tracking it; with ``notify`` (and no error) also
        unsubscribe it on the current link, in the background."""
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]
        link = self._current()
        sent = link is not None and link.ready and sub.generation == link.generation
        sub.end(reason, error)
        if notify and error is None and sent and link is not None:
            self._spawn(_quietly(link.request({"op": "unsubscribe", **_topic(sub)})))

    def end_all(self, reason: str, error: BaseException | None) -> None:
        """End every subscription (the client closed or was refused)."""
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.end(reason, error)


async def _quietly(request: Awaitable[Frame]) -> None:
    with contextlib.suppress(ClientError):
        await request
