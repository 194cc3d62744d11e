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
from typing import Any

from redis.asyncio.cluster import RedisCluster

from herald.engines.redis_wire import Endpoint, Inbox, RespConnection, connect, endpoint_from_url

__all__ = ["Links", "PubSubLink", "ShardLinks"]

_CONNECT_TIMEOUT = 2.0


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
    async def get(self) -> list[Any]:
        """Every raw pub/sub event received so far from any connection (at least one).

        Raises once a connection failed.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection (never raises)."""


class PubSubLink(Links):
    """One connection to one Redis: SUBSCRIBE for the control channel and every topic."""

    def __init__(self, url: str) -> None:
        self._endpoint = endpoint_from_url(url)
        self._connection: RespConnection | None = None

    async def open(self, control: bytes) -> None:
        """Connect (PING fails fast when Redis is down), then SUBSCRIBE the control channel."""
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            self._connection = await connect(self._endpoint)
        self._connection.send("SUBSCRIBE", control)

    async def subscribe(self, tags: list[bytes]) -> None:
        """One SUBSCRIBE for all of them."""
        self._opened().send("SUBSCRIBE", *tags)

    async def unsubscribe(self, tag: bytes) -> None:
        """UNSUBSCRIBE."""
        self._opened().send("UNSUBSCRIBE", tag)

    async def get(self) -> list[Any]:
        """Read the connection."""
        return await self._opened().inbox.take()

    async def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            self._connection.close()

    def _opened(self) -> RespConnection:
        if self._connection is None:
            raise ConnectionError("the pub/sub link is not open")
        return self._connection


class ShardLinks(Links):
    """Redis Cluster: one connection per master that owns a subscribed topic.

    Topics are SSUBSCRIBEd on the master that owns their slot, as the cluster
    client last saw the slot map (refreshed when the links open). The control
    channel is a classic channel, which the cluster bus carries to every node,
    so it is SUBSCRIBEd on one master. Every connection delivers into one inbox;
    the first failure of any of them is raised from `get`.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._nodes: dict[tuple[str, int], RespConnection] = {}
        self._inbox = Inbox()
        self._lock = asyncio.Lock()

    async def open(self, control: bytes) -> None:
        """Refresh the slot map (a failover may have moved masters), then link to one master."""
        # The client's first initialize() also readies its command parser.
        await self._cluster.initialize()
        await self._cluster.nodes_manager.initialize()
        primaries = self._cluster.get_primaries()
        if not primaries:
            raise ConnectionError("the cluster has no master")
        connection = await self._connection(primaries[0].host, int(primaries[0].port))
        connection.send("SUBSCRIBE", control)

    async def subscribe(self, tags: list[bytes]) -> None:
        """SSUBSCRIBE each tag on the master owning its slot (one command per master)."""
        by_node: dict[tuple[str, int], list[bytes]] = {}
        for tag in tags:
            node = self._cluster.get_node_from_key(tag.decode())
            if node is None:
                raise ConnectionError("a slot has no master")
            by_node.setdefault((node.host, int(node.port)), []).append(tag)
        for (host, port), group in by_node.items():
            connection = await self._connection(host, port)
            connection.send("SSUBSCRIBE", *group)

    async def unsubscribe(self, tag: bytes) -> None:
        """SUNSUBSCRIBE on the master it was subscribed on (the current owner of its slot)."""
        node = self._cluster.get_node_from_key(tag.decode())
        connection = self._nodes.get((node.host, int(node.port))) if node is not None else None
        if connection is not None:
            connection.send("SUNSUBSCRIBE", tag)

    async def get(self) -> list[Any]:
        """Whatever any connection delivered."""
        return await self._inbox.take()

    async def close(self) -> None:
        """Close every connection."""
        nodes, self._nodes = self._nodes, {}
        for connection in nodes.values():
            connection.close()

    async def _connection(self, host: str, port: int) -> RespConnection:
        # Under a lock: two topics of one new master must not open two connections.
        async with self._lock:
            connection = self._nodes.get((host, port))
            if connection is None:
                settings = self._cluster.nodes_manager.connection_kwargs
                endpoint = Endpoint(
                    host,
                    port,
                    username=settings.get("username"),
                    password=settings.get("password"),
                )
                # Logged in on a private inbox first, so its PONG is not taken for an event.
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    connection = await connect(endpoint)
                self._inbox.attach(connection)
                self._nodes[(host, port)] = connection
            return connection
