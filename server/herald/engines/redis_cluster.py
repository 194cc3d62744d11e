"""The Redis Cluster engine: the Redis engine, spread over the shards of a cluster.

Every key is hash-tagged already (see `herald.engines.redis`): a topic's stream,
its meta hash and its pub/sub channel share the slot of ``{app|channel|room}``,
and an app's records share the slot of ``{app}``. So the publish script runs on
the master that owns the topic, and it SPUBLISHes there: sharded pub/sub keeps
a message on its shard (plain PUBLISH would cross every node of the cluster).
Each worker SSUBSCRIBEs a topic on the master that owns it (`ShardLinks`).

Durability: a publish is acknowledged once a replica of its shard has it too
(WAIT 1 on the connection that wrote it), so a failover that promotes that
replica keeps every acknowledged message.

Failover: when a master dies or a slot moves, its connection fails or Redis
ends the shard subscriptions; the engine reloads the slot map, subscribes on
the new owners and replays from the streams what it missed, as it does after
a restart of a single Redis. Publishes to a slot answer 503 only while that
slot has no reachable master.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster

from herald.engines.redis import RedisEngine, publish_script
from herald.engines.redis_batch import PublishBatcher, Submission
from herald.engines.redis_links import Links, ShardLinks

__all__ = ["RedisClusterEngine", "parse_cluster_urls"]

_WAIT_MS = 1000  # longest a publish waits for a replica to confirm its write
_CONCURRENT_COMMANDS = 64  # commands one worker has in flight at once
_CONCURRENT_PIPELINES = 64  # pipelines one worker has in flight at once
# Connections per worker and master: a pipeline holds at most one per master, and the
# commands it retries after a redirection count as commands, so this is never reached.
_MAX_CONNECTIONS = 256
_REFRESH_EVERY = 5.0  # seconds between reads of the slot map

logger = logging.getLogger("herald.redis")


def parse_cluster_urls(urls: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """Startup nodes from ``redis://host:port,redis://host:port,...`` (or bare
    ``host:port``), and the credentials of the first URL that has them."""
    nodes: list[ClusterNode] = []
    credentials: dict[str, Any] = {}
    for part in urls.split(","):
        part = part.strip()
        if not part:
            continue
        url = urlsplit(part if "://" in part else f"redis://{part}")
        if url.scheme not in ("redis", "rediss") or not url.hostname:
            raise ValueError(f"not a Redis URL: {part!r}")
        nodes.append(ClusterNode(url.hostname, url.port or 6379))
        if url.password and not credentials:
            credentials = {"username": unquote(url.username or "") or None}
            credentials["password"] = unquote(url.password)
    if not nodes:
        raise ValueError("no Redis Cluster node given")
    return nodes, credentials


class _ReplicatedBatcher(PublishBatcher):
    """Publishes that WAIT for one replica of each shard they wrote to."""

    _redis: RedisCluster

    def _after_scripts(self, pipe: Any, groups: list[list[Submission]]) -> None:
        masters: dict[str, ClusterNode] = {}
        for group in groups:
            slot = self._redis.keyslot(group[0].keys[0])
            owners = self._redis.nodes_manager.slots_cache.get(slot, [])
            # A shard without a replica has nobody to wait for: WAIT would only time out.
            if len(owners) > 1:
                masters[owners[0].name] = owners[0]
        for master in masters.values():
            # Same master, same connection as the scripts: WAIT covers their writes.
            pipe.execute_command("WAIT", 1, _WAIT_MS, target_nodes=master)


class _WaitingPipeline(ClusterPipeline):
    """A cluster pipeline that runs once fewer than the limit are in flight."""

    def __init__(self, client: RedisCluster, transaction: Any, turns: asyncio.Semaphore) -> None:
        super().__init__(client, transaction)
        self._turns = turns

    async def execute(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Wait for a turn, then run the pipeline."""
        async with self._turns:
            return await super().execute(*args, **kwargs)


class _WaitingCluster(RedisCluster):
    """A cluster client whose callers wait for a connection rather than fail.

    redis-py's cluster client raises MaxConnectionsError once a master's pool is
    exhausted (the single-Redis engine uses a blocking pool instead): a burst of
    subscribes would turn into "unavailable". Commands and pipelines queue
    behind semaphores of their own (a pipeline retries redirected commands as
    commands, so one semaphore for both could deadlock), whose sum stays below
    each master's pool.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._commands = asyncio.Semaphore(_CONCURRENT_COMMANDS)
        self._pipelines = asyncio.Semaphore(_CONCURRENT_PIPELINES)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command once fewer than the limit are in flight."""
        async with self._commands:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        """A pipeline that waits for its turn (see `_WaitingPipeline`)."""
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused, as redis-py does
        # redis-py declares some attributes abstract that its own pipelines set at run time.
        return _WaitingPipeline(self, transaction, self._pipelines)  # type: ignore[abstract,unused-ignore]


class RedisClusterEngine(RedisEngine):
    """Engine backed by a Redis Cluster (Redis >= 7, for sharded pub/sub)."""

    def __init__(self, urls: str) -> None:
        self.url = urls
        nodes, credentials = parse_cluster_urls(urls)
        self.redis: RedisCluster = _WaitingCluster(  # type: ignore[assignment,unused-ignore]
            startup_nodes=nodes,
            # During a failover the other shards keep working.
            require_full_coverage=False,
            max_connections=_MAX_CONNECTIONS,
            socket_connect_timeout=2,
            socket_timeout=5,
            **credentials,
        )
        self._batcher = _ReplicatedBatcher(self.redis, publish_script("SPUBLISH"))
        self._setup()

    async def start(self, *args: Any, **kwargs: Any) -> None:
        """Start as the Redis engine does, and keep the slot map fresh in the background."""
        await super().start(*args, **kwargs)
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stop refreshing the slot map, then close as the Redis engine does."""
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            refresher.cancel()
            await asyncio.wait([refresher])
        await super().close()

    async def refresh_topology(self) -> None:
        """Read the slot map again: which master owns each slot, and its replicas.

        A replica shows up in the map once it holds data, and a failed one drops
        out of it; publishes WAIT only on masters the map shows a replica for.
        """
        await self.redis.nodes_manager.initialize()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_EVERY)
            try:
                await self.refresh_topology()
            except Exception as exc:  # the cluster may be failing over: next time
                logger.debug("slot map refresh failed: %s", exc)

    def _new_links(self) -> Links:
        """One pub/sub connection per master that owns a subscribed topic."""
        return ShardLinks(self.redis)
