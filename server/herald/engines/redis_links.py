"""The pub/sub side of the Redis engines: the connections messages arrive on.

A `Links` is everything one worker listens on: the control channel and each
subscribed topic's pub/sub channel. With one Redis that is one connection
(`PubSubLink`, SUBSCRIBE); with Redis Cluster it is one connection per master
that owns a subscribed topic (`ShardLinks`, SSUBSCRIBE), so a message crosses
only its shard. Either way the engine reads one stream of raw pub/sub events
from `Links.get`, which raises once any connection failed: the engine then
drops the links and builds new ones (resubscribing and replaying from the
streams), which is how it survives restarts and failovers alike.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["Links", "PubSubLink", "ShardLinks"]

_CONNECT_TIMEOUT = 2.0


def _client(**kwargs: Any) -> Redis:
    # No silent retries and no health checks: a link that fails must say so, because
    # only the engine knows how to resubscribe and replay what was missed.
    return Redis(
        socket_connect_timeout=_CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **kwargs,
    )


async def _close(pubsub: PubSub, client: Redis) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
    with contextlib.suppress(Exception):
        await client.aclose()


class Links(abc.ABC):
    """The connections one worker receives pub/sub messages on."""

    @abc.abstractmethod
    async def open(self, control: bytes) -> None:
        """Connect and SUBSCRIBE to the control channel (confirmed through `get`)."""

    @abc.abstractmethod
    async def subscribe(self, tags: list[bytes]) -> None:
        """Ask for the topics' channels; each confirmation arrives through `get`."""

    @abc.abstractmethod
    async def unsubscribe(self, tag: bytes) -> None:
        """Stop receiving one topic's channel."""

    @abc.abstractmethod
    async def get(self) -> dict[str, Any]:
        """The next raw pub/sub event from any connection; raises when one failed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection (never raises)."""


class PubSubLink(Links):
    """One connection to one Redis: SUBSCRIBE for the control channel and every topic."""

    def __init__(self, url: str) -> None:
        self._client = Redis.from_url(
            url,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._pubsub = self._client.pubsub()

    async def open(self, control: bytes) -> None:
        """PING (fails fast when Redis is down), then SUBSCRIBE the control channel."""
        await self._client.ping()
        await self._pubsub.subscribe(control)

    async def subscribe(self, tags: list[bytes]) -> None:
        """One SUBSCRIBE for all of them."""
        await self._pubsub.subscribe(*tags)

    async def unsubscribe(self, tag: bytes) -> None:
        """UNSUBSCRIBE."""
        await self._pubsub.unsubscribe(tag)

    async def get(self) -> dict[str, Any]:
        """Read the connection."""
        while True:
            raw = await self._pubsub.get_message(timeout=None)
            if raw is not None:
                return raw  # type: ignore[no-any-return,unused-ignore]

    async def close(self) -> None:
        """Close the connection."""
        await _close(self._pubsub, self._client)


class ShardLinks(Links):
    """Redis Cluster: one connection per master that owns a subscribed topic.

    Topics are SSUBSCRIBEd on the master that owns their slot, as the cluster
    client last saw the slot map (refreshed when the links open). The control
    channel is a classic channel, which the cluster bus carries to every node,
    so it is SUBSCRIBEd on one master. A reader task per connection feeds one
    queue; the first failure of any of them is raised from `get`.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._nodes: dict[str, tuple[Redis, PubSub]] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._lock = asyncio.Lock()

    async def open(self, control: bytes) -> None:
        """Refresh the slot map (a failover may have moved masters), then link to one master."""
        # The client's first initialize() also readies its command parser.
        await self._cluster.initialize()
        await self._cluster.nodes_manager.initialize()
        primaries = self._cluster.get_primaries()
        if not primaries:
            raise ConnectionError("the cluster has no master")
        await self._send(primaries[0].host, int(primaries[0].port), "subscribe", [control])

    async def subscribe(self, tags: list[bytes]) -> None:
        """SSUBSCRIBE each tag on the master owning its slot (one command per master)."""
        by_node: dict[tuple[str, int], list[bytes]] = {}
        for tag in tags:
            node = self._cluster.get_node_from_key(tag.decode())
            if node is None:
                raise ConnectionError("a slot has no master")
            by_node.setdefault((node.host, int(node.port)), []).append(tag)
        for (host, port), group in by_node.items():
            await self._send(host, port, "ssubscribe", group)

    async def unsubscribe(self, tag: bytes) -> None:
        """SUNSUBSCRIBE on the master it was subscribed on (the current owner of its slot)."""
        node = self._cluster.get_node_from_key(tag.decode())
        linked = self._nodes.get(node.name) if node is not None else None
        if linked is not None:
            await linked[1].sunsubscribe(tag)

    async def get(self) -> dict[str, Any]:
        """The next event any reader queued."""
        raw = await self._queue.get()
        if isinstance(raw, BaseException):
            raise raw
        return raw

    async def close(self) -> None:
        """Stop the readers, close every connection."""
        for reader in self._readers:
            reader.cancel()
        if self._readers:
            await asyncio.wait(self._readers, timeout=_CONNECT_TIMEOUT)
        nodes, self._nodes = self._nodes, {}
        for client, pubsub in nodes.values():
            await _close(pubsub, client)

    async def _send(self, host: str, port: int, command: str, channels: list[bytes]) -> None:
        # Under a lock: two topics of one new master must not open two connections.
        async with self._lock:
            name = f"{host}:{port}"
            linked = self._nodes.get(name)
            if linked is None:
                settings = self._cluster.nodes_manager.connection_kwargs
                client = _client(
                    host=host,
                    port=port,
                    username=settings.get("username"),
                    password=settings.get("password"),
                )
                pubsub = client.pubsub()
                try:
                    await client.ping()
                    await getattr(pubsub, command)(*channels)
                except BaseException:
                    await _close(pubsub, client)
                    raise
                # Started once the connection exists: reading needs one.
                self._nodes[name] = (client, pubsub)
                self._readers.append(asyncio.create_task(self._read(pubsub)))
            else:
                await getattr(linked[1], command)(*channels)

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                raw = await pubsub.get_message(timeout=None)
                if raw is not None:
                    self._queue.put_nowait(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever broke the link, the engine rebuilds the links
            self._queue.put_nowait(exc)
