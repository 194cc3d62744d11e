"""Updating and closing channels, seen from HTTP and from live subscribers on two workers."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tests.e2e.conftest import Api, clients_on_distinct_workers, open_api, open_client
from tests.support import RedisProcess, ServerProcess, scaled, start_server, wait_until


async def _token(api: Api, user: str) -> str:
    response = await api.http.post("/v1/tokens", json={"user_id": user})
    token: str = response.json()["data"]["token"]
    return token


async def test_close_tells_subscribers_on_every_worker_and_stops_publishes(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(open_api(two_workers))
        await api.create_channel(channel_name)
        first, second = await clients_on_distinct_workers(stack, two_workers, 2)
        await first.subscribe(channel_name)
        await second.subscribe(channel_name)
        kept = await api.publish_many(channel_name, 3)
        for client in (first, second):
            assert await client.message_ids(3) == kept

        closed = await api.http.delete(f"/v1/channels/{channel_name}")
        assert closed.status_code == 200
        assert closed.json()["data"]["is_inactive"] is True
        for client in (first, second):
            assert await client.recv() == {"op": "closed", "channel": channel_name, "room": ""}
            await client.assert_idle()
            # Unsubscribed: unsubscribing again is an error; subscribing again is refused.
            again = await client.request({"op": "subscribe", "id": "s", "channel": channel_name})
            assert again["op"] == "error"
            assert again["code"] == "gone"

        # Publishes are refused on every worker, at once (both workers answer in turn).
        for _ in range(6):
            response = await api.http.post(
                f"/v1/channels/{channel_name}/publish", json={"payload": "late"}
            )
            assert response.status_code == 410
        # History stays readable; listings hide the channel unless asked.
        assert await api.history_ids(channel_name) == kept
        listed = await api.http.get("/v1/channels", params={"limit": "200"})
        assert channel_name not in [c["name"] for c in listed.json()["data"]]
        listed = await api.http.get(
            "/v1/channels", params={"limit": "200", "include_inactive": "1"}
        )
        assert channel_name in [c["name"] for c in listed.json()["data"]]
        # Closing is irreversible and idempotent; updates are refused.
        assert (await api.http.delete(f"/v1/channels/{channel_name}")).status_code == 200
        patch = await api.http.patch(f"/v1/channels/{channel_name}", json={"description": "x"})
        assert patch.status_code == 410


async def test_update_applies_on_every_worker_at_once(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api:
        await api.create_channel(channel_name, custom_publish=True, writers={"any_user": True})
        ann = {"Authorization": f"Bearer {await _token(api, 'ann')}"}
        for _ in range(4):
            ok = await api.http.post(
                f"/v1/channels/{channel_name}/publish", json={"payload": 1}, headers=ann
            )
            assert ok.status_code == 201
        patch = await api.http.patch(
            f"/v1/channels/{channel_name}", json={"custom_publish": False, "description": "d"}
        )
        assert patch.status_code == 200, patch.text
        assert patch.json()["data"]["description"] == "d"
        assert patch.json()["data"]["custom_publish"] is False
        for _ in range(6):
            refused = await api.http.post(
                f"/v1/channels/{channel_name}/publish", json={"payload": 1}, headers=ann
            )
            assert refused.status_code == 403


async def test_update_rules(server: ServerProcess, channel_name: str) -> None:
    async with open_api(server) as api:
        await api.create_channel(
            channel_name,
            readers={"public": True, "immutable": True},
            editors={"user_ids": ["ed"]},
            annotations=[{"type": "a", "value": 1}],
        )
        url = f"/v1/channels/{channel_name}"
        immutable = await api.http.put(url, json={"readers": {"public": False}})
        assert immutable.status_code == 400
        assert immutable.json()["path"] == "readers"
        kind = await api.http.patch(url, json={"type": "separate_rooms"})
        assert (kind.status_code, kind.json()["path"]) == (400, "type")
        bad = await api.http.patch(url, json={"history_size": 0})
        assert (bad.status_code, bad.json()["path"]) == (400, "history_size")
        # Nothing of a refused update was applied.
        current = (await api.http.get(url)).json()["data"]
        assert current["history_size"] == 100
        assert current["readers"]["public"] is True
        # Editors may edit; other users may not; users learn which they are.
        ed = {"Authorization": f"Bearer {await _token(api, 'ed')}"}
        other = {"Authorization": f"Bearer {await _token(api, 'zed')}"}
        assert (await api.http.get(url, headers=ed)).json()["data"]["you_can_edit"] is True
        assert (await api.http.get(url, headers=other)).json()["data"]["you_can_edit"] is False
        done = await api.http.patch(
            url, json={"annotations": [], "history_size": 7, "idle_timeout": 60}, headers=ed
        )
        assert done.status_code == 200, done.text
        data = done.json()["data"]
        assert (data["annotations"], data["history_size"], data["idle_timeout"]) == ([], 7, 60)
        assert (
            await api.http.patch(url, json={"description": "x"}, headers=other)
        ).status_code == 403
        assert (await api.http.delete(url, headers=other)).status_code == 403
        assert (await api.http.patch("/v1/channels/nope-x", json={})).status_code == 404


async def test_closed_frame_reaches_msgpack_and_room_subscribers(
    server: ServerProcess, channel_name: str
) -> None:
    async with open_api(server) as api, open_client(server, "herald.msgpack") as client:
        await api.create_channel(channel_name, type="separate_rooms")
        await client.subscribe(channel_name, room="r1")
        assert (await api.http.delete(f"/v1/channels/{channel_name}")).status_code == 200
        assert await client.recv() == {"op": "closed", "channel": channel_name, "room": "r1"}


async def test_an_idle_channel_closes_itself_once_on_every_worker(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = start_server(
        tmp_path,
        "--redis",
        fresh_redis.url,
        "--workers",
        "2",
        env={"HERALD_IDLE_SWEEP_INTERVAL": "0.2"},
    )
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(open_api(server))
            await api.create_channel(channel_name, idle_timeout=2)
            first, second = await clients_on_distinct_workers(stack, server, 2)
            await first.subscribe(channel_name)
            await second.subscribe(channel_name)
            # Publishing keeps it open past its first deadline.
            for _ in range(3):
                await api.publish(channel_name, "keep-alive")
                await asyncio.sleep(1)
            assert (await api.http.get(f"/v1/channels/{channel_name}")).json()["data"][
                "is_inactive"
            ] is False
            # Then silence: both workers' subscribers are told, once.
            for client in (first, second):
                await client.messages(3)
                frame = await client.recv(timeout=10)
                assert frame == {"op": "closed", "channel": channel_name, "room": ""}
                await client.assert_idle()
            channel = (await api.http.get(f"/v1/channels/{channel_name}")).json()["data"]
            assert channel["is_inactive"] is True
        assert server.log().count(f"closing channel default/{channel_name}: idle") == 1
    finally:
        server.stop()


async def _calls(redis: Any, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_counts_add_up_connections_on_every_worker(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    server = start_server(
        tmp_path,
        "--redis",
        fresh_redis.url,
        "--workers",
        "2",
        env={"HERALD_PRESENCE_INTERVAL": "0.2"},
    )
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(open_api(server))
            await api.create_channel(channel_name)
            clients = await clients_on_distinct_workers(stack, server, 2)
            for _ in range(3):
                clients.append(await stack.enter_async_context(open_client(server)))
            for client in clients:
                await client.subscribe(channel_name)
            await api.publish_many(channel_name, 2)

            async def counted(expected: int) -> bool:
                # Ask several times: each answer comes from whichever worker takes it.
                for _ in range(4):
                    response = await api.http.get(f"/v1/channels/{channel_name}")
                    counts = response.json()["data"]["counts"]
                    if counts != {"messages": 2, "subscribers": 0, "connections": expected}:
                        return False
                return True

            await wait_until(lambda: counted(5), seconds=10)
            await clients[0].request({"op": "unsubscribe", "id": "u", "channel": channel_name})
            await wait_until(lambda: counted(4), seconds=10)

            redis: Any = aioredis.from_url(fresh_redis.url)
            try:
                # Unchanged counts are kept fresh, not written again (with many channels a
                # report is large): no HSET in five rounds of both workers. (The answers
                # above may all have come from the worker that unsubscribed, which knows
                # its own count before it reports it.)
                await asyncio.sleep(scaled(0.5))  # the unsubscribe's report is made by now
                written = await _calls(redis, "hset")
                await asyncio.sleep(1.0)
                assert await _calls(redis, "hset") == written
                # When Redis loses them (a restart without persistence, a flush), the
                # workers notice and report in full again.
                reports = [key async for key in redis.scan_iter(match="herald:{presence}:*")]
                assert len(reports) == 2  # one per worker
                await redis.delete(*reports)
            finally:
                await redis.aclose()
            await wait_until(lambda: counted(4), seconds=10)
    finally:
        server.stop()
