"""The Redis Cluster fixtures themselves: a real cluster, as redis-py's cluster client sees it.

These tests hold `tests.cluster` to what the engine tests rely on: the ports it names
as masters, owners and replicas are the ones clients end up talking to, sharded pub/sub
stays on the owning shard, and a failover keeps replicated writes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from tests.cluster import RedisClusterProcess
from tests.support import scaled

pytestmark = pytest.mark.redis


def _client(cluster: RedisClusterProcess) -> RedisCluster:
    """A cluster client given every node as a startup node, as ``--redis-cluster`` is."""
    nodes = [ClusterNode("127.0.0.1", port) for port in cluster.ports]
    return RedisCluster(startup_nodes=nodes, decode_responses=True)


def _direct(port: int) -> Redis:
    """One connection to one node: WAIT and READONLY apply to the connection they run on."""
    return Redis(host="127.0.0.1", port=port, decode_responses=True, single_connection_client=True)


def _unique(name: str) -> str:
    """A key or channel name no other test (sharing the session cluster) uses."""
    return f"{name}-{secrets.token_hex(4)}"


async def _next_of(kind: str, receive: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """The next pub/sub message of type ``kind`` that ``receive`` hands over."""
    async with asyncio.timeout(scaled(5)):
        while True:
            message = await receive()
            if message is not None and message["type"] == kind:
                return dict(message)


async def test_layout_is_three_masters_each_with_a_replica(
    redis_cluster: RedisClusterProcess,
) -> None:
    ports = redis_cluster.ports
    assert len(set(ports)) == 6
    assert [urlsplit(url).port for url in redis_cluster.url.split(",")] == ports
    masters = redis_cluster.masters()
    assert len(masters) == 3
    replicas = [redis_cluster.replica_of(master) for master in masters]
    assert sorted(masters + replicas) == sorted(ports)
    for master, replica in zip(masters, replicas, strict=True):
        # The replica's own account, not the cluster's gossip.
        replication = await redis_cluster.cli(replica, "INFO", "replication")
        assert "role:slave" in replication
        assert f"master_port:{master}" in replication
        assert "master_link_status:up" in replication
    async with _client(redis_cluster) as client:
        assert sorted(node.port for node in client.get_primaries()) == masters


async def test_keys_on_different_slots_land_on_the_masters_named(
    redis_cluster: RedisClusterProcess,
) -> None:
    masters = redis_cluster.masters()
    prefix = _unique("spread")
    keys: dict[int, str] = {}
    for n in range(1000):
        key = f"{prefix}-{n}"
        keys.setdefault(redis_cluster.master_of(key), key)
        if len(keys) == len(masters):
            break
    assert sorted(keys) == masters
    async with _client(redis_cluster) as client:
        for port, key in keys.items():
            assert await client.set(key, f"on {port}")
        for port, key in keys.items():
            assert await client.get(key) == f"on {port}"
            # Stored on the master master_of named, not merely somewhere in the cluster.
            assert (await redis_cluster.cli(port, "GET", key)).strip() == f"on {port}"
            other = next(master for master in masters if master != port)
            assert (await redis_cluster.cli(other, "GET", key)).startswith("MOVED ")


async def test_sharded_pubsub_delivers_on_the_owning_shard(
    redis_cluster: RedisClusterProcess,
) -> None:
    channel = _unique("news")
    master = redis_cluster.master_of(channel)
    replica = redis_cluster.replica_of(master)
    async with (
        _client(redis_cluster) as client,
        _direct(replica) as on_replica,
        client.pubsub() as pubsub,
        on_replica.pubsub() as replica_pubsub,
    ):
        await pubsub.ssubscribe(channel)
        await replica_pubsub.ssubscribe(channel)
        # Confirmed subscriptions only: SPUBLISH runs on another connection.
        await _next_of("ssubscribe", lambda: pubsub.get_sharded_message(timeout=0.1))
        await _next_of("ssubscribe", lambda: replica_pubsub.get_message(timeout=0.1))

        # SPUBLISH counts the subscribers of the node it ran on: the cluster client's
        # subscription is on the master that owns the channel.
        assert await client.spublish(channel, "hello") == 1
        got = await _next_of("smessage", lambda: pubsub.get_sharded_message(timeout=0.1))
        assert got["data"] == "hello"
        # Sharded messages spread to the owning shard's replicas, and only there.
        got = await _next_of("smessage", lambda: replica_pubsub.get_message(timeout=0.1))
        assert got["data"] == "hello"
        other = next(port for port in redis_cluster.masters() if port != master)
        moved = await redis_cluster.cli(other, "SPUBLISH", channel, "astray")
        assert moved.startswith("MOVED ")
        assert moved.split()[2] == f"127.0.0.1:{master}"


async def test_replicated_write_survives_failover_and_old_master_rejoins(
    fresh_redis_cluster: RedisClusterProcess,
) -> None:
    cluster = fresh_redis_cluster
    key = "kept"
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    async with _client(cluster) as client:
        async with _direct(master) as on_master:
            assert await on_master.set(key, "before the crash")
            # Acknowledged by the replica, so the failover below cannot lose it.
            assert await on_master.wait(1, 1000) == 1
        # The client caches the slot map that still points at the master about to die.
        assert await client.get(key) == "before the crash"

        cluster.kill(master)
        assert await cluster.wait_for_failover(master) == replica
        assert cluster.master_of(key) == replica
        assert master not in cluster.masters()
        assert len(cluster.masters()) == 3
        assert await client.get(key) == "before the crash"
        assert await client.set(key, "after the failover")

        await cluster.restart(master)
        assert cluster.replica_of(replica) == master
        assert master not in cluster.masters()
        assert await client.get(key) == "after the failover"
        async with _direct(master) as on_old_master:
            # A replica serves reads only to connections that asked for READONLY.
            assert await on_old_master.readonly()
            assert await on_old_master.get(key) == "after the failover"


def test_missing_binaries_point_to_the_setup_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"redis-server is not installed: run scripts/test\.sh"):
        RedisClusterProcess(tmp_path).start()


def test_a_node_that_fails_to_start_is_named_with_its_log(tmp_path: Path) -> None:
    cluster = RedisClusterProcess(tmp_path, node_timeout_ms=-1)
    with pytest.raises(RuntimeError, match=r"cluster node \d+ exited with 1") as failure:
        cluster.start()
    assert "FATAL CONFIG FILE ERROR" in str(failure.value)
    # Every node started before the failure was stopped again.
    assert all(
        node.proc is None or node.proc.poll() is not None for node in cluster._nodes.values()
    )
