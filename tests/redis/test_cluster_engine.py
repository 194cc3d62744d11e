"""What only the Redis Cluster engine does: sharded pub/sub, WAIT, scripts per master.

The engine contract (tests/contract) runs against this engine too; these tests
read the cluster's own counters to prove how the engine uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from herald.engines.redis_cluster import RedisClusterEngine
from herald.models import Channel, Message, Topic
from tests.cluster import RedisClusterProcess
from tests.support import wait_until

pytestmark = pytest.mark.redis


def _draft(topic: Topic, payload: object) -> Message:
    return Message(
        "", topic.app, topic.channel, topic.room, payload, {"type": "key", "id": "k"}, ""
    )


def _tag(topic: Topic) -> str:
    return f"herald:{{{topic.app}|{topic.channel}|{topic.room}}}"


async def _calls(cluster: RedisClusterProcess, port: int, command: str) -> int:
    stats = await cluster.cli(port, "INFO", "commandstats")
    for line in stats.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@pytest.fixture
async def engine(fresh_redis_cluster: RedisClusterProcess) -> AsyncIterator[RedisClusterEngine]:
    """A started cluster engine on the test's own cluster."""
    delivered: list[Message] = []
    built = RedisClusterEngine(fresh_redis_cluster.url)
    await built.start(delivered.append)
    yield built
    await built.close()


def _channels_on_every_master(cluster: RedisClusterProcess, count: int = 12) -> list[Channel]:
    channels = [Channel(app="a", name=f"c{n}") for n in range(count)]
    owners = {cluster.master_of(_tag(c.topic())) for c in channels}
    assert owners == set(cluster.masters())
    return channels


async def test_publishes_go_to_the_topics_shard_with_spublish_and_wait(
    engine: RedisClusterEngine, fresh_redis_cluster: RedisClusterProcess
) -> None:
    cluster = fresh_redis_cluster
    channels = _channels_on_every_master(cluster)
    for channel in channels:
        await engine.subscribe(channel.topic())
    # A replica appears in the slot map once it holds data (the engine reads the map
    # every few seconds): write once, then read the map now rather than wait for it.
    await engine.publish_many([(c, _draft(c.topic(), "warm")) for c in channels])

    async def replicas_known() -> bool:
        await engine.refresh_topology()
        slots = engine.redis.nodes_manager.slots_cache
        return all(len(slots[engine.redis.keyslot(_tag(c.topic()))]) == 2 for c in channels)

    await wait_until(replicas_known, 20)
    for port in cluster.masters():
        await cluster.cli(port, "CONFIG", "RESETSTAT")

    await engine.publish_many([(c, _draft(c.topic(), n)) for n, c in enumerate(channels)])

    for port in cluster.masters():
        mine = [c for c in channels if cluster.master_of(_tag(c.topic())) == port]
        # Each master ran the script for its own topics, published on its shard only,
        # and was asked to wait for its replica.
        assert await _calls(cluster, port, "evalsha") == len(mine)
        assert await _calls(cluster, port, "spublish") == len(mine)
        assert await _calls(cluster, port, "publish") == 0
        assert await _calls(cluster, port, "wait") == 1
        # The worker listens on the owner of each topic, nowhere else.
        for channel in channels:
            answer = await cluster.cli(port, "PUBSUB", "SHARDNUMSUB", _tag(channel.topic()))
            listeners = int(answer.split()[1])
            assert listeners == (1 if channel in mine else 0)


async def test_a_master_that_forgot_the_script_runs_only_its_own_groups_again(
    engine: RedisClusterEngine, fresh_redis_cluster: RedisClusterProcess
) -> None:
    cluster = fresh_redis_cluster
    channels = _channels_on_every_master(cluster)
    await engine.publish_many([(c, _draft(c.topic(), "first")) for c in channels])
    # One master forgets its scripts (as after a restart); the other two still have it.
    forgetful = cluster.masters()[0]
    assert (await cluster.cli(forgetful, "SCRIPT", "FLUSH")).strip() == "OK"

    stored = await engine.publish_many([(c, _draft(c.topic(), "second")) for c in channels])

    assert [m.payload for m in stored] == ["second"] * len(channels)
    for channel, message in zip(channels, stored, strict=True):
        history = await engine.history(channel.topic())
        # Once each: the groups that ran on the other masters were not sent twice.
        assert [m.payload for m in history] == ["first", "second"]
        assert history[-1].id == message.id


async def test_a_burst_of_commands_waits_for_connections_instead_of_failing(
    engine: RedisClusterEngine,
) -> None:
    # Hundreds of clients subscribing at once each cost a few commands: more than the
    # connections the engine keeps per master. They must queue, not fail.
    channels = [Channel(app="a", name=f"burst{n}") for n in range(600)]
    await asyncio.gather(*(engine.create_channel(c) for c in channels))
    found = await asyncio.gather(*(engine.get_channel("a", c.name) for c in channels))
    positions = await asyncio.gather(*(engine.position(c.topic()) for c in channels))
    assert [c.name for c in found if c is not None] == [c.name for c in channels]
    assert all(p.offset == "0-0" for p in positions)
