"""Automatic pipelining of publishes for the Redis engine.

Publishes submitted while a pipeline is in flight wait in a queue and leave
together in the next one: a burst costs one round trip, and publishes to one
topic share one script call (one XADD each, one trim, one PUBLISH for all).
Only one pipeline is in flight at a time, which keeps submission order: two
publishes to one topic reach Redis in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from herald.engines.redis_wire import Endpoint, RespConnection, connect
from herald.errors import Unavailable

__all__ = ["PublishBatcher", "Submission", "WirePublishBatcher"]

_MAX_BATCH = 5000  # publishes per pipeline
_MAX_GROUP = 1000  # messages per script call
_MAX_TOPICS = 100  # topics per script call, where one call may carry several
_TIMEOUT = 5.0  # seconds a pipeline may take, connecting included


@dataclass(slots=True)
class Submission:
    """One publish: its topic's keys and settings (script arguments), body and counter.

    ``settings`` are the script's arguments after the epoch candidate: history
    size, ttl, pub/sub channel, meta grace.
    """

    keys: tuple[str, str]
    settings: tuple[Any, ...]
    body: bytes
    counter: tuple[str, str]
    id: str = ""


@dataclass(slots=True)
class _Request:
    submissions: list[Submission]
    future: asyncio.Future[None]


class PublishBatcher:
    """Queues publishes and sends them in ordered pipelines, grouped by topic."""

    def __init__(self, redis: Redis | RedisCluster, script: str) -> None:
        self._redis = redis
        self._script = script
        self._sha: str | None = None
        self._queue: list[_Request] = []
        self._queued = 0
        self._sender: asyncio.Task[None] | None = None

    def submit(self, submissions: list[Submission]) -> asyncio.Future[None]:
        """Queue publishes; the future completes once each has its ``id``. Never awaits."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(submissions, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return future

    async def _send(self) -> None:
        try:
            while self._queue:
                batch: list[_Request] = []
                size = 0
                while self._queue and size < _MAX_BATCH:
                    request = self._queue.pop(0)
                    batch.append(request)
                    size += len(request.submissions)
                try:
                    await self._send_batch([s for r in batch for s in r.submissions])
                except (RedisError, RedisClusterException, OSError) as exc:
                    error = Unavailable(f"Redis is unavailable: {type(exc).__name__}")
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(error)
                else:
                    for request in batch:
                        if not request.future.done():
                            request.future.set_result(None)
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[Submission]) -> None:
        # Group by topic, keeping order within each topic (groups of one topic follow
        # each other in the pipeline). A topic's settings are those of its first message.
        groups: list[list[Submission]] = []
        current: dict[tuple[str, str], list[Submission]] = {}
        for submission in batch:
            group = current.get(submission.keys)
            if group is None or len(group) == _MAX_GROUP:
                group = current[submission.keys] = []
                groups.append(group)
            group.append(submission)
        if self._sha is None:
            self._sha = await self._redis.script_load(self._script)
        results = await self._pipeline(groups, self._sha, count=True)
        forgotten = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if forgotten:
            # A Redis (or one master of a cluster) restarted and forgot the script: those
            # groups did not run, the others did. Load it again and run just those.
            self._sha = await self._redis.script_load(self._script)
            again = await self._pipeline([groups[i] for i in forgotten], self._sha, count=False)
            for i, result in zip(forgotten, again, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        for group, ids in zip(groups, results, strict=True):
            for submission, raw in zip(group, ids, strict=True):
                submission.id = raw.decode()

    def _commands(
        self, groups: list[list[Submission]], sha: str, *, count: bool
    ) -> list[tuple[Any, ...]]:
        """One EVALSHA per group, then (``count``) one HINCRBY per channel."""
        epoch = secrets.token_hex(4)  # for topics that have none yet
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", sha, 2, *group[0].keys, epoch, *group[0].settings, *(s.body for s in group))
            for group in groups
        ]
        if count:
            commands += _increments(Counter(s.counter for group in groups for s in group))
        return commands

    def _after_scripts(self, pipe: Any, groups: list[list[Submission]]) -> None:
        """Queue commands that must follow the scripts on their connections (none here)."""

    async def _pipeline(
        self, groups: list[list[Submission]], sha: str, *, count: bool
    ) -> list[Any]:
        """The scripts' results, in order, errors as values (the HINCRBYs' are dropped).

        ``count``: also add the messages to their channels' counters. A second try of
        groups whose script Redis had forgotten does not: the first try counted them.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in self._commands(groups, sha, count=count):
                # The generic form: the cluster pipeline blocks its evalsha() method, but
                # routes EVALSHA by its keys just fine (all of one topic's slot).
                pipe.execute_command(*command)
            self._after_scripts(pipe, groups)
            # Errors come back as results: a script missing on one server must not hide
            # which groups did run.
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results[: len(groups)]

    async def close(self) -> None:
        """Release what the batcher holds of its own (nothing here)."""


class WirePublishBatcher(PublishBatcher):
    """One Redis: each pipeline is one write on a connection of the batcher's own.

    hiredis packs the commands and parses the replies (`RespConnection.call`);
    through redis-py both cost more than running the publish script in Redis.
    The connection is opened when needed and dropped after any failure, since
    replies of a pipeline cut short could otherwise be read as the next one's.
    """

    def __init__(self, redis: Redis, script: str, endpoint: Endpoint) -> None:
        super().__init__(redis, script)
        self._endpoint = endpoint
        self._connection: RespConnection | None = None

    async def _pipeline(
        self, groups: list[list[Submission]], sha: str, *, count: bool
    ) -> list[Any]:
        """Run the commands on the batcher's connection; error replies as redis-py errors.

        The script here takes several topics a call (``_PUBLISH_MANY``): the answer of
        each call is split back into one result per group. A call that fails fails all
        of its groups (Redis refuses a script before it runs for a missing script or
        lack of memory, so none of them ran). Each call also counts the messages it
        publishes, so ``count`` has nothing to add: a call tried again counts once.
        """
        calls = _calls(groups)
        epoch = secrets.token_hex(4)  # for topics that have none yet
        commands: list[tuple[Any, ...]] = []
        for call in calls:
            keys: list[str] = []
            args: list[Any] = []
            for group in call:
                first = group[0]
                keys += [*first.keys, first.counter[0]]
                args += [*first.settings, first.counter[1], len(group)]
                args += [s.body for s in group]
            commands.append(("EVALSHA", sha, len(keys), *keys, epoch, *args))
        try:
            async with asyncio.timeout(_TIMEOUT):
                if self._connection is None or self._connection.closed:
                    self._connection = await connect(self._endpoint)
                replies = await self._connection.call(commands)
        except BaseException:
            await self.close()
            raise
        results: list[Any] = []
        for call, reply in zip(calls, replies, strict=False):
            if isinstance(reply, hiredis.ReplyError):
                results += [_error(reply)] * len(call)
            else:
                results += reply
        return results

    async def close(self) -> None:
        """Close the batcher's connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _increments(counts: Counter[tuple[str, str]]) -> list[tuple[Any, ...]]:
    """One HINCRBY per channel: its message count (advisory: `counts.messages`)."""
    return [("HINCRBY", key, name, count) for (key, name), count in counts.items()]


def _calls(groups: list[list[Submission]]) -> list[list[list[Submission]]]:
    """The groups, in order, cut into script calls of at most ``_MAX_TOPICS`` topics and
    (unless one group alone is larger) ``_MAX_GROUP`` messages."""
    calls: list[list[list[Submission]]] = []
    current: list[list[Submission]] = []
    size = 0
    for group in groups:
        if current and (len(current) == _MAX_TOPICS or size + len(group) > _MAX_GROUP):
            calls.append(current)
            current, size = [], 0
        current.append(group)
        size += len(group)
    if current:
        calls.append(current)
    return calls


def _error(reply: hiredis.ReplyError) -> ResponseError:
    # The error classes the batcher (and redis-py users) know: NOSCRIPT means reload.
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)
