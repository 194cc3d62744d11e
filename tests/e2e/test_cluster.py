"""Herald on Redis Cluster: several nodes, each with several workers, on one cluster.

The cluster is real (3 masters, 3 replicas, started by the tests); so are the
``herald serve`` processes and their WebSocket clients. The failover test kills
the master that owns the channel's slot while messages flow.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import RedisClusterProcess
from tests.e2e.conftest import (
    Api,
    WSClient,
    clients_on_distinct_workers,
    open_api,
    open_client,
    open_socket,
)
from tests.support import ServerProcess, scaled, start_server, wait_until

pytestmark = pytest.mark.redis


def _node(tmp_path: Path, cluster: RedisClusterProcess, *extra: str) -> ServerProcess:
    return start_server(tmp_path, "--redis-cluster", cluster.url, "--workers", "2", *extra)


@pytest.fixture
def two_nodes(
    tmp_path: Path, redis_cluster: RedisClusterProcess
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two Herald nodes (two workers each) on the shared cluster."""
    first = _node(tmp_path, redis_cluster)
    try:
        second = _node(tmp_path, redis_cluster)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


def _tag(channel: str) -> str:
    """The hash-tagged pub/sub channel (and stream key prefix) of a channel of app default."""
    return f"herald:{{default|{channel}|}}"


async def test_every_subscriber_on_every_node_gets_every_publish_in_order(
    two_nodes: tuple[ServerProcess, ServerProcess],
    redis_cluster: RedisClusterProcess,
    channel_name: str,
) -> None:
    first, second = two_nodes
    # Enough channels that every master owns some: each worker links to all three.
    channels = [f"{channel_name}-{i}" for i in range(12)]
    assert len({redis_cluster.master_of(_tag(c)) for c in channels}) == 3
    async with AsyncExitStack() as stack:
        api_a = await stack.enter_async_context(open_api(first))
        api_b = await stack.enter_async_context(open_api(second))
        for channel in channels:
            await api_a.create_channel(channel)
        clients = [
            *await clients_on_distinct_workers(stack, first, 2),
            *await clients_on_distinct_workers(stack, second, 2),
        ]
        for client in clients:
            for channel in channels:
                await client.subscribe(channel)
        expected: list[tuple[str, str]] = []
        for round_ in range(3):
            for i, channel in enumerate(channels):
                api = (api_a, api_b)[(i + round_) % 2]
                expected.append((channel, await api.publish(channel, {"n": round_})))
        for client in clients:
            frames = await client.messages(len(expected))
            received = [(frame["channel"], frame["id"]) for frame in frames]
            # Per channel in publish order; channels interleave as their shards answer.
            for channel in channels:
                assert [m for c, m in received if c == channel] == [
                    m for c, m in expected if c == channel
                ]
            await client.assert_idle()


async def test_recovery_with_since_works_across_nodes(
    two_nodes: tuple[ServerProcess, ServerProcess], channel_name: str
) -> None:
    first, second = two_nodes
    async with open_api(first) as api_a, open_api(second) as api_b:
        await api_a.create_channel(channel_name)
        async with open_client(first) as client:
            answer = await client.subscribe(channel_name)
            epoch = answer["position"]["epoch"]
            seen = await api_b.publish(channel_name, {"n": 0})
            assert await client.message_ids(1) == [seen]
        missed = [await (api_a, api_b)[i % 2].publish(channel_name, {"n": i}) for i in range(1, 6)]
        async with open_client(second) as client:
            answer = await client.subscribe(channel_name, since=seen, epoch=epoch)
            assert answer["recovered"] is True
            assert await client.message_ids(5) == missed
            await client.assert_idle()
        assert await api_b.history_ids(channel_name) == [seen, *missed]


async def test_device_command_reaches_a_device_on_the_other_node(
    two_nodes: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = two_nodes
    async with open_api(first) as api_a, open_api(second) as api_b:
        body = {"address": f"addr-{secrets.token_hex(6)}", "platform": "toy"}
        registered = await api_a.http.post("/v1/devices", json={"device": body})
        assert registered.status_code == 201, registered.text
        device_id = registered.json()["data"]["device_id"]
        key = registered.json()["data"]["connection_key"]
        async with open_socket(first) as device:
            answer = await device.request({"op": "connect", "id": "hi", "connection_key": key})
            assert answer["op"] == "connected", answer
            for n in range(4):  # several requests: both of node B's workers take some
                call = asyncio.create_task(
                    api_b.http.post(f"/v1/devices/{device_id}/commands", json={"payload": n})
                )
                command = await device.recv()
                assert command["op"] == "command", command
                assert command["payload"] == n
                await device.send(
                    {"op": "reply", "command_id": command["command_id"], "payload": {"ok": n}}
                )
                response = await call
                assert response.status_code == 200, response.text
                assert response.json()["data"]["reply"] == {"ok": n}


class _Publisher:
    """Publishes numbered messages as fast as answers come; records what was acknowledged."""

    def __init__(self, api: Api, channel: str) -> None:
        self.api = api
        self.channel = channel
        self.acknowledged: dict[int, str] = {}
        self.refused: list[int] = []
        self.statuses: list[int] = []
        self.stopping = False

    async def run(self) -> None:
        n = 0
        while not self.stopping:
            try:
                response = await self.api.http.post(
                    f"/v1/channels/{self.channel}/publish", json={"payload": {"n": n}}
                )
            except httpx.HTTPError:
                self.refused.append(n)
            else:
                self.statuses.append(response.status_code)
                if response.status_code == 201:
                    self.acknowledged[n] = response.json()["data"]["id"]
                else:
                    # Only "unavailable" may be answered while a shard has no master.
                    assert response.status_code == 503, response.text
                    self.refused.append(n)
            n += 1
            await asyncio.sleep(0.005)


async def _collect(client: WSClient, into: list[Any], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            frame = await client.recv(timeout=0.5)
        except TimeoutError:
            continue
        assert frame["op"] == "message", frame
        into.append((frame["payload"]["n"], frame["id"]))


async def test_failover_of_the_channels_master_loses_nothing_acknowledged(
    tmp_path: Path, fresh_redis_cluster: RedisClusterProcess, channel_name: str
) -> None:
    cluster = fresh_redis_cluster
    node = _node(tmp_path, cluster)
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(open_api(node))
            await api.create_channel(channel_name, history_size=10_000)
            subscribers = await clients_on_distinct_workers(stack, node, 2)
            for client in subscribers:
                await client.subscribe(channel_name)
            received: list[list[Any]] = [[] for _ in subscribers]
            stop = asyncio.Event()
            readers = [
                asyncio.create_task(_collect(client, into, stop))
                for client, into in zip(subscribers, received, strict=True)
            ]
            publisher = _Publisher(api, channel_name)
            publishing = asyncio.create_task(publisher.run())
            await asyncio.sleep(scaled(1))
            before = len(publisher.acknowledged)
            assert before > 0, publisher.statuses

            master = cluster.master_of(_tag(channel_name))
            cluster.kill(master)
            await cluster.wait_for_failover(master)
            assert cluster.master_of(_tag(channel_name)) != master

            async def published_again() -> bool:
                return len(publisher.acknowledged) >= before + 50

            # Publishing works again on the promoted replica.
            await wait_until(published_again, 20)
            publisher.stopping = True
            await publishing
            # Both workers saw their link to the old master fail, and rebuilt it.
            assert node.log().count("pub/sub link to Redis lost") >= 2, node.log()

            # Every acknowledged message reaches every subscriber, once, in order.
            acknowledged = sorted(publisher.acknowledged.items())

            async def all_delivered() -> bool:
                wanted = set(publisher.acknowledged)
                return all(wanted <= {n for n, _ in into} for into in received)

            await wait_until(all_delivered, 20)
            stop.set()
            await asyncio.gather(*readers)
            for into in received:
                numbers = [n for n, _ in into]
                assert numbers == sorted(set(numbers)), "a message arrived twice or out of order"
                delivered = dict(into)
                for n, message_id in acknowledged:
                    assert delivered.get(n) == message_id
            # And history agrees: nothing acknowledged vanished with the old master.
            history = set(await api.history_ids(channel_name))
            assert {m for _, m in acknowledged} <= history
    finally:
        node.stop()
