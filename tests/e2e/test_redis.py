"""Herald on the Redis engine: several workers and processes, recovery anywhere, outages.

Every test starts its own ``redis-server`` and real ``herald serve`` processes.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Api, clients_on_distinct_workers, open_api, open_client
from tests.support import (
    RedisProcess,
    ServerProcess,
    start_redis,
    start_server,
    wait_until,
)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis with ``appendonly yes`` (fsync always): a restart loses nothing acknowledged."""
    proc = start_redis(tmp_path, appendonly=True)
    yield proc
    proc.stop()


def _herald(tmp_path: Path, redis: RedisProcess, *extra: str) -> ServerProcess:
    return start_server(tmp_path, "--redis", redis.url, *extra)


async def test_subscribers_on_every_worker_receive_in_order(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(open_api(two_workers))
        await api.create_channel(channel_name)
        first, second = await clients_on_distinct_workers(stack, two_workers, 2)
        assert first.connected["server"] != second.connected["server"]
        await first.subscribe(channel_name)
        await second.subscribe(channel_name)
        # Published through whichever worker takes each HTTP request.
        ids = await api.publish_many(channel_name, 60)
        assert await first.message_ids(60) == ids
        assert await second.message_ids(60) == ids


async def test_publish_over_websocket_reaches_the_other_worker(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(open_api(two_workers))
        await api.create_channel(channel_name)
        publisher, listener = await clients_on_distinct_workers(stack, two_workers, 2)
        await listener.subscribe(channel_name)
        answer = await publisher.request(
            {"op": "publish", "id": "p1", "channel": channel_name, "payload": "hi"}
        )
        assert answer["op"] == "published"
        [message] = await listener.messages(1)
        assert (message["id"], message["payload"]) == (answer["message_id"], "hi")


async def test_recovery_on_another_process(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    node_a = _herald(tmp_path, fresh_redis)
    node_b = _herald(tmp_path, fresh_redis)
    try:
        async with open_api(node_a) as api:
            await api.create_channel(channel_name)
            async with open_client(node_a) as client:
                await client.subscribe(channel_name)
                seen = await api.publish_many(channel_name, 5)
                assert await client.message_ids(5) == seen
            # The client is gone; more is published meanwhile, through both nodes.
            missed = await api.publish_many(channel_name, 5)
            async with open_api(node_b) as api_b:
                missed += await api_b.publish_many(channel_name, 5)
                async with open_client(node_b) as client:
                    answer = await client.subscribe(channel_name, since=seen[-1])
                    assert answer["recovered"] is True
                    assert await client.message_ids(10) == missed
                    live = await api.publish(channel_name, "live")
                    assert await client.message_ids(1) == [live]
                    await client.assert_idle()
    finally:
        node_a.stop()
        node_b.stop()


async def test_recovery_races_publishes_on_another_process(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    node_a = _herald(tmp_path, fresh_redis)
    node_b = _herald(tmp_path, fresh_redis)
    try:
        async with open_api(node_a) as api, open_client(node_b) as client:
            await api.create_channel(channel_name)
            before = await api.publish_many(channel_name, 3)
            publishing = asyncio.create_task(api.publish_many(channel_name, 200))
            await asyncio.sleep(0)  # let the first publishes start before the subscribe
            answer = await client.subscribe(channel_name, since=before[0])
            assert answer["recovered"] is True
            racing = await publishing
            expected = before[1:] + racing
            assert await client.message_ids(len(expected)) == expected
            await client.assert_idle()
    finally:
        node_a.stop()
        node_b.stop()


async def test_recovered_false_when_history_was_trimmed_or_wiped(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = _herald(tmp_path, fresh_redis)
    try:
        async with open_api(server) as api:
            await api.create_channel(channel_name, history_size=3)
            ids = await api.publish_many(channel_name, 6)
            async with open_client(server) as client:
                answer = await client.subscribe(channel_name, since=ids[0])
                assert answer["recovered"] is False
                assert await client.message_ids(3) == ids[3:]
            async with open_client(server) as client:
                answer = await client.subscribe(channel_name, since=ids[2])
                assert answer["recovered"] is True
                assert await client.message_ids(3) == ids[3:]
                epoch = answer["position"]["epoch"]
            # Redis loses the topic's history (eviction, a restart without persistence) and
            # newer messages follow. An old id must not pass for a quiet stream.
            tag = f"herald:{{default|{channel_name}|}}"
            assert await fresh_redis.cli("DEL", f"{tag}:s", f"{tag}:m") == "2\n"
            fresh = await api.publish_many(channel_name, 2)
            async with open_client(server) as client:
                answer = await client.subscribe(channel_name, since=ids[-1])
                assert answer["recovered"] is False
                assert answer["position"]["epoch"] != epoch
                assert await client.message_ids(2) == fresh
            async with open_client(server) as client:
                answer = await client.subscribe(channel_name, since="0-0", epoch=epoch)
                assert answer["recovered"] is False
    finally:
        server.stop()


async def test_pubsub_reconnect_replays_what_the_link_missed(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = _herald(tmp_path, fresh_redis)
    try:
        async with open_api(server) as api, open_client(server) as client:
            await api.create_channel(channel_name)
            await client.subscribe(channel_name)
            publishing = asyncio.create_task(api.publish_many(channel_name, 150))
            # Cut only the pub/sub link, mid-stream: commands keep working, so publishes
            # succeed while the worker is not listening.
            for _ in range(3):
                await asyncio.sleep(0.05)
                await fresh_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
            ids = await publishing
            try:
                received = await client.message_ids(150, timeout=20)
            except TimeoutError:
                pytest.fail(f"not all 150 arrived; the server's log:\n{server.log()[-6000:]}")
            assert received == ids
            await client.assert_idle()
        assert "pub/sub link to Redis lost" in server.log()
    finally:
        server.stop()


async def _until_ready(api: Api) -> None:
    """Readiness is a state the server reports, not an event the test can await."""

    async def ready() -> bool:
        return (await api.http.get("/readyz")).status_code == 200

    await wait_until(ready, seconds=20, interval=0.1)


async def _publish_status(api: Api, channel: str) -> httpx.Response:
    return await api.http.post(f"/v1/channels/{channel}/publish", json={"payload": "x"})


async def test_redis_outage_503_then_delivery_resumes(
    tmp_path: Path, durable_redis: RedisProcess, channel_name: str
) -> None:
    server = _herald(tmp_path, durable_redis)
    try:
        async with open_api(server) as api, open_client(server) as client:
            await api.create_channel(channel_name)
            await client.subscribe(channel_name)
            before = await api.publish_many(channel_name, 10)
            assert await client.message_ids(10) == before

            durable_redis.kill()
            response = await _publish_status(api, channel_name)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"].isdigit()
            assert response.json()["code"] == "unavailable"
            ready = await api.http.get("/readyz")
            assert ready.status_code == 503
            # The socket stays open and answers while Redis is away.
            await client.assert_idle()
            assert server.proc.poll() is None

            durable_redis.start()
            await _until_ready(api)
            after = await api.publish_many(channel_name, 10)
            # Same socket, no reconnect: delivery resumes.
            assert await client.message_ids(10) == after
            await client.assert_idle()
            # Nothing acknowledged was lost across the Redis restart.
            assert await api.history_ids(channel_name) == before + after
    finally:
        assert server.stop() == 0
        assert "Traceback" not in server.log()


async def test_workers_flag_with_redis_shares_records(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(open_api(two_workers))
        await api.create_channel(channel_name)
        # Whichever worker answers, the channel is there, with the same id.
        ids = set()
        for _ in range(10):
            response = await api.http.get(f"/v1/channels/{channel_name}")
            assert response.status_code == 200
            ids.add(response.json()["data"]["id"])
        assert len(ids) == 1


def test_sigterm_stops_every_worker(two_workers: ServerProcess) -> None:
    assert two_workers.stop(signal.SIGTERM) == 0


async def _numsub(redis: RedisProcess, channel: str) -> int:
    """How many pub/sub connections listen to a channel's default topic."""
    out = await redis.cli("PUBSUB", "NUMSUB", f"herald:{{default|{channel}|}}")
    return int(out.split()[-1])


async def _until_numsub(redis: RedisProcess, channel: str, expected: int) -> None:
    """The server releases a closed socket's topics on its own time: poll for it."""

    async def reached() -> bool:
        return await _numsub(redis, channel) == expected

    await wait_until(reached, seconds=5)


async def test_a_worker_listens_to_a_topic_only_while_it_has_subscribers(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = _herald(tmp_path, fresh_redis)
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(open_api(server))
            await api.create_channel(channel_name)
            assert await _numsub(fresh_redis, channel_name) == 0
            clients = [await stack.enter_async_context(open_client(server)) for _ in range(3)]
            for client in clients:
                await client.subscribe(channel_name)
            # Three local subscribers, one pub/sub subscription.
            assert await _numsub(fresh_redis, channel_name) == 1
            for client in clients[:2]:
                answer = await client.request(
                    {"op": "unsubscribe", "id": "u", "channel": channel_name}
                )
                assert answer["op"] == "unsubscribed"
            assert await _numsub(fresh_redis, channel_name) == 1
            await clients[2].request({"op": "unsubscribe", "id": "u", "channel": channel_name})
            assert await _numsub(fresh_redis, channel_name) == 0
            # A disconnect releases the topic too.
            async with open_client(server) as client:
                await client.subscribe(channel_name)
                assert await _numsub(fresh_redis, channel_name) == 1
            await _until_numsub(fresh_redis, channel_name, 0)
    finally:
        server.stop()


async def test_one_publish_per_message_whatever_the_subscriber_count(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = _herald(tmp_path, fresh_redis)
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(open_api(server))
            await api.create_channel(channel_name)
            clients = [await stack.enter_async_context(open_client(server)) for _ in range(5)]
            for client in clients:
                await client.subscribe(channel_name)
            await fresh_redis.cli("CONFIG", "RESETSTAT")
            ids = await api.publish_many(channel_name, 20)
            for client in clients:
                assert await client.message_ids(20) == ids
            stats = await fresh_redis.cli("INFO", "commandstats")
            publish = next(
                line for line in stats.splitlines() if line.startswith("cmdstat_publish:")
            )
            assert publish.split("calls=")[1].split(",")[0] == "20"
            # The stream holds exactly what was acknowledged, under the same ids.
            tag = f"herald:{{default|{channel_name}|}}"
            entries = await fresh_redis.cli("XRANGE", f"{tag}:s", "-", "+")
            assert [
                line for line in entries.splitlines() if "-" in line and line[0].isdigit()
            ] == ids
    finally:
        server.stop()


async def test_a_topic_already_listened_to_answers_the_newest_position(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = _herald(tmp_path, fresh_redis)
    try:
        async with open_api(server) as api, AsyncExitStack() as stack:
            await api.create_channel(channel_name)
            first = await stack.enter_async_context(open_client(server))
            start = (await first.subscribe(channel_name))["position"]
            ids = await api.publish_many(channel_name, 3)
            assert await first.message_ids(3) == ids
            # The worker knows this topic: the position comes from what it delivered,
            # and it is the newest id, not the one of the first subscribe.
            second = await stack.enter_async_context(open_client(server))
            position = (await second.subscribe(channel_name))["position"]
            assert position == {"offset": ids[-1], "epoch": start["epoch"]}
            more = await api.publish_many(channel_name, 2)
            assert await second.message_ids(2) == more
            await second.assert_idle()
            # The same position recovers exactly what followed it, on a new connection.
            third = await stack.enter_async_context(open_client(server))
            await third.subscribe(channel_name, since=position["offset"], epoch=position["epoch"])
            assert await third.message_ids(2) == more
    finally:
        server.stop()
