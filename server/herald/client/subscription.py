"""One topic a client follows, as an async iterator of messages.

A `Subscription` outlives connections: the client keeps it across reconnects
and resumes it from its cursor (the last id it buffered), and the cursor
drops anything not newer, so the application sees every message once, in
order. Its buffer is bounded: when the application stops reading, the client
stops reading the socket, the server eventually cuts the connection as a slow
consumer, and the reconnect recovers from history what was not read. Nothing
is lost and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from herald.client.errors import ClientClosed
from herald.client.frames import Frame, Gap, Message, Position, TopicKey, is_newer

if TYPE_CHECKING:
    from herald.client.connection import Client

__all__ = ["GapHandler", "Subscription"]

logger = logging.getLogger("herald.client")

GapHandler = Callable[["Subscription", Gap], None]
"""Called (synchronously, from the client's reader) when a resubscription reports
``recovered: false``."""


class Subscription:
    """Messages of one channel (and room), in publish order, each once.

    ``async for message in subscription`` yields `Message` objects until the
    subscription ends: `unsubscribe`, the client closing, the channel being
    closed (``end_reason == "closed"``) or a persistent subscription removed by
    an admin end it quietly once the buffer is drained; an error (a fatal close,
    a resubscription refused) is raised from the iterator instead.

    Recovery that could not be complete is surfaced, never hidden: ``recovered``
    is the latest answer's flag, ``gaps`` lists every `Gap`, and ``on_gap`` is
    called for each.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        room: str,
        *,
        since: str | None = None,
        epoch: str | None = None,
        subscriber_key: str | None = None,
        persistent: bool = False,
        max_buffer: int = 10_000,
        on_gap: GapHandler | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.room = room
        self.persistent = persistent
        """Whether the server subscribed this connection itself (a device's or a
        user's persistent subscription) rather than the application."""
        self.subscriber_key = subscriber_key
        self.position: Position | None = None
        """The topic's position in the latest ``subscribed`` answer."""
        self.epoch = epoch
        """The history epoch this subscription has read from; sent back on resubscribe."""
        self.recovered: bool | None = None
        """The latest answer's ``recovered`` (None when it asked for no recovery)."""
        self.gaps: list[Gap] = []
        self.on_gap = on_gap
        self.duplicates = 0
        """Messages dropped because they were not newer than the cursor."""
        self.end_reason: str | None = None
        """Why iteration ended: ``unsubscribed``, ``closed`` (the channel), ``client
        closed``, or an error's text; None while it runs."""
        # The last id buffered (or the position or ``since`` before any message):
        # where a resubscription resumes, and the bar every message must clear.
        self._cursor = since
        self._max = max_buffer
        self._buffer: deque[Message] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._error: BaseException | None = None
        self._taken = 0
        self.persist_pending = False
        """Whether the next subscribe frame asks the server to persist it."""
        # Set by the client: the connection generation this subscription was
        # (re)subscribed on, and whether that connection delivers to it yet.
        self.generation = -1
        self.live = False
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def key(self) -> TopicKey:
        """``(channel, room)``."""
        return self.channel, self.room

    @property
    def last_id(self) -> str | None:
        """The cursor: the newest id buffered, or where the subscription started."""
        return self._cursor

    @property
    def ended(self) -> bool:
        """Whether no more messages will be buffered."""
        return self.end_reason is not None

    @property
    def taken(self) -> int:
        """How many messages the application has taken from this subscription."""
        return self._taken

    def __repr__(self) -> str:
        room = f" room={self.room!r}" if self.room else ""
        return f"<Subscription {self.channel!r}{room} last_id={self._cursor!r}>"

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while not self._buffer:
            if self.end_reason is not None:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        message = self._buffer.popleft()
        self._taken += 1
        if len(self._buffer) < self._max:
            self._writable.set()
        return message

    async def get(self, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        """The next message; `StopAsyncIteration` once ended, `TimeoutError` after ``timeout``."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def pending(self) -> int:
        """Messages buffered and not taken yet."""
        return len(self._buffer)

    async def unsubscribe(self, *, persist: bool = False) -> None:
        """Stop receiving (``persist=True`` also drops a persistent subscription)."""
        await self.client.unsubscribe(self, persist=persist)

    # Called by the client.

    def wait_ready(self) -> Awaitable[None]:
        """Resolves at the first ``subscribed`` answer, or fails with the refusal."""
        return self._ready

    def answered(self, frame: Frame, generation: int) -> None:
        """Take a ``subscribed`` frame: go live on its connection, note the position,
        and surface ``recovered: false``. Called by the reader before it reads the
        next frame, so no replayed message can slip past a subscription not yet live.
        """
        if self.end_reason is not None:
            return  # an answer that arrives after the application gave up on it
        position = Position.from_frame(frame)
        epoch_changed = self.epoch is not None and position.epoch != self.epoch
        recovered = frame.get("recovered")
        self.recovered = recovered if isinstance(recovered, bool) else None
        since = self._cursor
        if self._cursor is None:
            self._cursor = position.offset
        elif epoch_changed and not is_newer(position.offset, self._cursor):
            # A rebuilt history whose ids do not reach our cursor: start from its end,
            # or the cursor would drop its messages until they overtake it.
            self._cursor = position.offset
        if recovered is False:
            gap = Gap(since, position, epoch_changed)
            self.gaps.append(gap)
            logger.warning(
                "%s: the server could not recover everything after %s", self.channel, gap.since
            )
            if self.on_gap is not None:
                try:
                    self.on_gap(self, gap)
                except Exception:  # the application's callback must not kill the reader
                    logger.exception("on_gap callback failed")
        self.position = position
        self.epoch = position.epoch
        self.generation = generation
        self.live = True
        if not self._ready.done():
            self._ready.set_result(None)

    async def offer(self, message: Message) -> None:
        """Buffer a message unless it is not newer than the cursor; waits while full."""
        if not is_newer(message.id, self._cursor):
            self.duplicates += 1
            return
        while len(self._buffer) >= self._max and self.end_reason is None:
            self._writable.clear()
            await self._writable.wait()
        if self.end_reason is not None:
            return
        self._buffer.append(message)
        self._cursor = message.id
        self._readable.set()

    def reset(self, since: str, epoch: str | None) -> None:
        """Restart from ``since`` (the application asked for recovery on a topic the
        server had subscribed it to); only before anything was taken."""
        self._buffer.clear()
        self._writable.set()
        self._cursor = since
        self.epoch = epoch
        self.live = False

    def end(self, reason: str, error: BaseException | None = None) -> None:
        """Stop buffering; the iterator drains what is buffered, then stops or raises."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self._error = error
        self.live = False
        self._readable.set()
        self._writable.set()
        if not self._ready.done():
            self._ready.set_exception(error or ClientClosed(f"subscription ended: {reason}"))
            # Nobody may be waiting (a persistent subscription nobody asked for).
            self._ready.exception()
