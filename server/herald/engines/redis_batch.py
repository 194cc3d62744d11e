"""Automatic pipelining of publishes for the Redis engine.

Publishes submitted while a pipeline is in flight wait in a queue and leave
together in the next one, so a burst costs one round trip instead of one per
message, and Python pays redis-py's per-call overhead once per batch. Only one
pipeline is in flight at a time, which keeps submission order: two publishes
to one topic reach Redis in the order they were submitted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from herald.errors import Unavailable

__all__ = ["PublishBatcher"]

_MAX_BATCH = 1000


@dataclass(slots=True)
class _Publish:
    keys: tuple[str, str]
    args: tuple[Any, ...]
    counter: tuple[str, str]
    future: asyncio.Future[str]


class PublishBatcher:
    """Queues publish-script calls and sends them in ordered pipelines."""

    def __init__(self, redis: Redis, script: str) -> None:
        self._redis = redis
        self._script = script
        self._sha: str | None = None
        self._queue: list[_Publish] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(
        self, keys: tuple[str, str], args: tuple[Any, ...], counter: tuple[str, str]
    ) -> asyncio.Future[str]:
        """Queue one script call; the future gets the new message id. Never awaits.

        ``counter`` is the (hash, field) whose message count goes up by one.
        """
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append(_Publish(keys, args, counter, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return future

    async def _send(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                try:
                    await self._send_batch(batch)
                except (RedisError, OSError) as exc:
                    error = Unavailable(f"Redis is unavailable: {type(exc).__name__}")
                    for publish in batch:
                        if not publish.future.done():
                            publish.future.set_exception(error)
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[_Publish]) -> None:
        if self._sha is None:
            self._sha = await self._redis.script_load(self._script)
        try:
            ids = await self._pipeline(batch, self._sha)
        except NoScriptError:
            # Redis restarted and forgot the script: nothing of this batch ran.
            self._sha = await self._redis.script_load(self._script)
            ids = await self._pipeline(batch, self._sha)
        for publish, message_id in zip(batch, ids, strict=True):
            if not publish.future.done():
                publish.future.set_result(message_id)

    async def _pipeline(self, batch: list[_Publish], sha: str) -> list[str]:
        counts = Counter(publish.counter for publish in batch)
        async with self._redis.pipeline(transaction=False) as pipe:
            for publish in batch:
                pipe.evalsha(sha, 2, *publish.keys, *publish.args)
            # Counts are advisory (channel `counts.messages`): one HINCRBY per channel.
            for (key, field), count in counts.items():
                pipe.hincrby(key, field, count)
            results = await pipe.execute()
        return [raw.decode() for raw in results[: len(batch)]]
