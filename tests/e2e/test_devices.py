"""Devices end to end: real sockets acting as devices, on two workers sharing Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from tests.e2e.conftest import (
    JSON,
    MSGPACK,
    Api,
    Frame,
    WSClient,
    open_api,
    open_client,
    open_socket,
)
from tests.support import ServerProcess, scaled, wait_until

pytestmark = pytest.mark.redis


async def register(api: Api, **device: Any) -> tuple[str, str]:
    """Register a new device; its id and connection key."""
    body = {"address": f"addr-{secrets.token_hex(6)}", "platform": "toy", **device}
    response = await api.http.post("/v1/devices", json={"device": body})
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    return data["device_id"], data["connection_key"]


@asynccontextmanager
async def open_device(
    server: ServerProcess, key: str, encoding: str = JSON
) -> AsyncIterator[WSClient]:
    """A socket connected as a device."""
    async with open_socket(server, encoding) as client:
        answer = await client.request({"op": "connect", "id": "hi", "connection_key": key})
        assert answer["op"] == "connected", answer
        client.connected = answer
        yield client


async def devices_on_workers(
    stack: AsyncExitStack, server: ServerProcess, keys: list[str], workers: list[str]
) -> list[WSClient]:
    """Connect device ``keys[i]`` on worker ``workers[i]`` (retrying until the kernel
    hands the connection to that worker)."""
    clients = []
    async with asyncio.timeout(scaled(20)):
        for key, worker in zip(keys, workers, strict=True):
            while True:
                attempt = AsyncExitStack()
                client = await attempt.enter_async_context(open_device(server, key))
                if client.connected["server"] == worker:
                    stack.push_async_exit(attempt.pop_all())
                    clients.append(client)
                    break
                await attempt.aclose()
                await asyncio.sleep(0.02)
    return clients


async def worker_names(server: ServerProcess) -> list[str]:
    """The two workers' names (from connections that land on each)."""
    names: set[str] = set()
    async with asyncio.timeout(scaled(20)):
        while len(names) < 2:
            async with open_client(server) as client:
                names.add(client.connected["server"])
    return sorted(names)


async def add_subscriber(api: Api, channel: str, **body: Any) -> Frame:
    response = await api.http.post(f"/v1/channels/{channel}/subscribers", json=body)
    assert response.status_code in (200, 201), response.text
    data: Frame = response.json()["data"]
    return data


async def subscribers(api: Api, channel: str) -> list[Frame]:
    response = await api.http.get(f"/v1/channels/{channel}/subscribers")
    assert response.status_code == 200, response.text
    data: list[Frame] = response.json()["data"]
    return data


async def test_registered_device_connects_to_its_persistent_channels(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api, AsyncExitStack() as stack:
        await api.create_channel(channel_name, readers={"public": False})
        device_id, key = await register(api)
        added = await add_subscriber(api, channel_name, connection_key=key)
        assert (added["device_id"], added["active"]) == (device_id, False)
        again = await api.http.post(
            f"/v1/channels/{channel_name}/subscribers", json={"device_id": device_id}
        )
        assert again.status_code == 200  # already a subscriber

        device = await stack.enter_async_context(open_device(two_workers, key, MSGPACK))
        assert device.connected["device_id"] == device_id
        resumed = await device.recv()
        assert (resumed["op"], resumed["channel"], resumed.get("id")) == (
            "subscribed",
            channel_name,
            None,
        )
        message_id = await api.publish(channel_name, {"hello": "toy"})
        [frame] = await device.messages(1)
        assert (frame["id"], frame["payload"]) == (message_id, {"hello": "toy"})
        assert await subscribers(api, channel_name) == [
            {"type": "device", "device_id": device_id, "active": True}
        ]
        await stack.aclose()
        await wait_until(lambda: _inactive(api, channel_name))


async def _inactive(api: Api, channel: str) -> bool:
    return not any(entry["active"] for entry in await subscribers(api, channel))


async def test_subscribers_added_and_removed_while_connected_change_at_once(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api, AsyncExitStack() as stack:
        await api.create_channel(channel_name)
        workers = await worker_names(two_workers)
        ids, keys = zip(*[await register(api) for _ in workers], strict=True)
        devices = await devices_on_workers(stack, two_workers, list(keys), workers)
        for device_id, device in zip(ids, devices, strict=True):
            await add_subscriber(api, channel_name, device_id=device_id)
            subscribed = await device.recv()
            assert (subscribed["op"], subscribed["channel"]) == ("subscribed", channel_name)
        await api.publish(channel_name, "both")
        for device in devices:
            assert [m["payload"] for m in await device.messages(1)] == ["both"]

        removed = await api.http.request(
            "DELETE", f"/v1/channels/{channel_name}/subscribers", params={"device_id": ids[0]}
        )
        assert removed.status_code == 200, removed.text
        assert (await devices[0].recv())["op"] == "unsubscribed"
        await api.publish(channel_name, "second only")
        assert [m["payload"] for m in await devices[1].messages(1)] == ["second only"]
        await devices[0].assert_idle()
        again = await api.http.request(
            "DELETE", f"/v1/channels/{channel_name}/subscribers", params={"device_id": ids[0]}
        )
        assert again.status_code == 404

        # Closing the channel drops every persistent subscriber.
        assert (await api.http.delete(f"/v1/channels/{channel_name}")).status_code == 200
        assert (await devices[1].recv())["op"] == "closed"
        assert await subscribers(api, channel_name) == []


async def test_device_subscribes_itself_with_the_subscriber_key(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    created = await api.create_channel(channel_name, readers={"public": False})
    subscriber_key = created["keys"]["subscriber_key"]
    device_id, key = await register(api)
    async with open_device(server, key) as device:
        refused = await device.request({"op": "subscribe", "id": 1, "channel": channel_name})
        assert (refused["op"], refused["code"]) == ("error", "forbidden")
        wrong = await device.request(
            {"op": "subscribe", "id": 2, "channel": channel_name, "subscriber_key": key}
        )
        assert wrong["op"] == "error"
        await device.subscribe(channel_name, subscriber_key=subscriber_key, persist=True)
    # The server learns of the closed socket a moment after the client closed it.
    await wait_until(lambda: _inactive(api, channel_name))
    assert await subscribers(api, channel_name) == [
        {"type": "device", "device_id": device_id, "active": False}
    ]
    async with open_device(server, key) as device:
        assert (await device.recv())["op"] == "subscribed"
        await api.publish(channel_name, 1)
        assert len(await device.messages(1)) == 1


async def test_opted_out_device_stays_connected_and_receives_nothing(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    address = f"addr-{secrets.token_hex(6)}"
    device_id, key = await register(api, address=address, opt_in=False)
    await add_subscriber(api, channel_name, device_id=device_id)
    async with open_device(server, key) as device:
        assert (await device.recv())["op"] == "subscribed"
        await api.publish(channel_name, "not for you")
        await device.assert_idle()
        assert (await subscribers(api, channel_name))[0]["active"] is False
        command = await api.http.post(f"/v1/devices/{device_id}/commands", json={"payload": 1})
        assert (command.status_code, command.json()["code"]) == (409, "opted_out")

        opted_in = await api.http.post(
            "/v1/devices", json={"device": {"address": address, "platform": "toy", "opt_in": True}}
        )
        assert opted_in.status_code == 200
        await wait_until(lambda: _active(api, channel_name))
        await api.publish(channel_name, "now yes")
        assert [m["payload"] for m in await device.messages(1)] == ["now yes"]


async def _active(api: Api, channel: str) -> bool:
    return all(entry["active"] for entry in await subscribers(api, channel))


async def test_commands_reach_the_device_on_any_worker_and_return_its_reply(
    two_workers: ServerProcess,
) -> None:
    async with open_api(two_workers) as api, AsyncExitStack() as stack:
        workers = await worker_names(two_workers)
        registered = [await register(api) for _ in workers]
        ids = [device_id for device_id, _ in registered]
        devices = await devices_on_workers(stack, two_workers, [k for _, k in registered], workers)

        async def answer(device: WSClient, reply: Any) -> None:
            command = await device.recv()
            assert command["op"] == "command", command
            assert "channel" not in command
            await device.send(
                {"op": "reply", "command_id": command["command_id"], "payload": reply}
            )

        # Several calls so that some HTTP requests land on the other worker than the device.
        for round_ in range(4):
            for device_id, device in zip(ids, devices, strict=True):
                call = asyncio.create_task(
                    api.http.post(
                        f"/v1/devices/{device_id}/commands",
                        json={"payload": {"do": "blink", "n": round_}},
                    )
                )
                await answer(device, {"ok": device_id, "n": round_})
                response = await call
                assert response.status_code == 200, response.text
                assert response.json()["data"]["reply"] == {"ok": device_id, "n": round_}
                assert response.json()["data"]["device_id"] == device_id


async def test_wrong_late_and_duplicate_replies_are_ignored(two_workers: ServerProcess) -> None:
    async with open_api(two_workers) as api, AsyncExitStack() as stack:
        workers = await worker_names(two_workers)
        (first_id, first_key), (_, second_key) = [await register(api) for _ in workers]
        first, second = await devices_on_workers(
            stack, two_workers, [first_key, second_key], workers
        )
        call = asyncio.create_task(
            api.http.post(f"/v1/devices/{first_id}/commands", json={"payload": "ping"})
        )
        command = await first.recv()
        # Another device answering the first one's command is ignored...
        await second.send({"op": "reply", "command_id": command["command_id"], "payload": "evil"})
        await second.assert_idle()
        await asyncio.sleep(0.2)
        assert not call.done()
        # ...the real reply wins, and a second one from the device goes nowhere.
        await first.send({"op": "reply", "command_id": command["command_id"], "payload": "pong"})
        await first.send({"op": "reply", "command_id": command["command_id"], "payload": "again"})
        response = await call
        assert response.json()["data"]["reply"] == "pong"
        await first.assert_idle()

        # No reply in time: 504; the late reply after it is ignored.
        timed_out = await api.http.post(
            f"/v1/devices/{first_id}/commands", json={"payload": "slow", "timeout_ms": 200}
        )
        assert (timed_out.status_code, timed_out.json()["code"]) == (504, "timeout")
        late = await first.recv()
        await first.send({"op": "reply", "command_id": late["command_id"], "payload": "late"})
        await first.assert_idle()

    async with open_api(two_workers) as api:
        # Nobody holds the device now.
        gone = await api.http.post(f"/v1/devices/{first_id}/commands", json={"payload": 1})
        assert (gone.status_code, gone.json()["code"]) == (409, "not_connected")
        unknown = await api.http.post("/v1/devices/dev_nobody/commands", json={"payload": 1})
        assert unknown.status_code == 404
        bad = await api.http.post(
            f"/v1/devices/{first_id}/commands", json={"payload": 1, "timeout_ms": 0}
        )
        assert (bad.status_code, bad.json()["path"]) == (400, "timeout_ms")


async def test_chref_command_is_accepted_at_once_and_reaches_every_device_subscriber(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api, AsyncExitStack() as stack:
        created = await api.create_channel(channel_name)
        ref = created["keys"]["ref"]
        workers = await worker_names(two_workers)
        registered = [await register(api) for _ in workers]
        for device_id, _ in registered:
            await add_subscriber(api, channel_name, device_id=device_id)
        devices = await devices_on_workers(stack, two_workers, [k for _, k in registered], workers)
        for device in devices:
            assert (await device.recv())["op"] == "subscribed"
        browser = await stack.enter_async_context(open_client(two_workers))
        await browser.subscribe(channel_name)

        # Answered while no device has read anything, and nobody ever replies.
        response = await api.http.post(
            f"/v1/devices/chref:{ref}/commands", json={"payload": {"all": "dance"}}
        )
        assert response.status_code == 200, response.text
        assert response.json()["data"]["delivered"] == "accepted"
        command_id = response.json()["data"]["command_id"]
        for device in devices:
            frame = await device.recv()
            assert frame == {
                "op": "command",
                "command_id": command_id,
                "payload": {"all": "dance"},
                "channel": channel_name,
            }
        await browser.assert_idle()
        unknown = await api.http.post("/v1/devices/chref:nope/commands", json={"payload": 1})
        assert unknown.status_code == 404


async def test_uninstall_disconnects_the_device_wherever_it_is(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api:
        await api.create_channel(channel_name)
        device_id, key = await register(api)
        await add_subscriber(api, channel_name, device_id=device_id)
        async with open_device(two_workers, key) as device:
            assert (await device.recv())["op"] == "subscribed"
            response = await api.http.post("/v1/devices/uninstall", json={"device_id": device_id})
            assert response.status_code == 202, response.text
            error = await device.recv()
            assert (error["op"], error["code"]) == ("error", "unauthorized")
            assert await device.close_code() == 4001
        async with open_socket(two_workers) as again:
            await again.send({"op": "connect", "id": 1, "connection_key": key})
            assert (await again.recv())["code"] == "unauthorized"
            assert await again.close_code() == 4001
        assert await subscribers(api, channel_name) == []


async def test_audience_reaches_exactly_the_matching_devices_live_and_on_recovery(
    two_workers: ServerProcess, channel_name: str
) -> None:
    async with open_api(two_workers) as api, AsyncExitStack() as stack:
        await api.create_channel(channel_name)
        workers = await worker_names(two_workers)
        specs = {
            "red-toaster": {"tags": {"device": ["toaster"], "colour": ["red"]}},
            "blue-toaster": {"tags": {"device": ["toaster"], "colour": ["blue"]}},
            "red-lamp": {"tags": {"device": ["lamp"], "colour": ["red"]}},
            "bare": {},
        }
        ids: dict[str, str] = {}
        keys: dict[str, str] = {}
        for name, fields in specs.items():
            ids[name], keys[name] = await register(api, **fields)
            await add_subscriber(api, channel_name, device_id=ids[name])
        names = list(specs)
        devices = dict(
            zip(
                names,
                await devices_on_workers(
                    stack, two_workers, [keys[n] for n in names], [workers[i % 2] for i in range(4)]
                ),
                strict=True,
            )
        )
        for device in devices.values():
            assert (await device.recv())["op"] == "subscribed"
        browser = await stack.enter_async_context(open_client(two_workers))
        start = (await browser.subscribe(channel_name))["position"]["offset"]

        audiences: list[tuple[dict[str, Any], set[str]]] = [
            ({"tag": "toaster"}, {"red-toaster", "blue-toaster"}),
            (
                {"and": [{"tag": "red", "group": "colour"}, {"not": {"tag": "toaster"}}]},
                {"red-lamp"},
            ),
            (
                {"or": [{"device_id": ids["bare"]}, {"tag": "blue", "group": "colour"}]},
                {"bare", "blue-toaster"},
            ),
            ({"not": {"tag": "red", "group": "colour"}}, {"blue-toaster", "bare"}),
        ]
        expected: dict[str, list[int]] = {name: [] for name in names}
        for n, (audience, selected) in enumerate(audiences):
            await api.publish(channel_name, n, audience=audience)
            for name in selected:
                expected[name].append(n)
        await api.publish(channel_name, "everyone")
        for name, device in devices.items():
            got = [m["payload"] for m in await device.messages(len(expected[name]) + 1)]
            assert got == [*expected[name], "everyone"], name
        # A subscriber that is no device sees only what has no audience.
        assert [m["payload"] for m in await browser.messages(1)] == ["everyone"]
        await browser.assert_idle()

        # Recovery applies the same filter to history.
        for name in ("red-lamp", "bare"):
            async with open_device(two_workers, keys[name]) as again:
                await again.recv()  # resumed live subscription
                await again.send({"op": "unsubscribe", "id": "u", "channel": channel_name})
                assert (await again.recv())["op"] == "unsubscribed"
                await again.subscribe(channel_name, since=start)
                got = [m["payload"] for m in await again.messages(len(expected[name]) + 1)]
                assert got == [*expected[name], "everyone"], name
                await again.assert_idle()


async def test_a_reconnecting_device_resumes_after_the_ids_its_connect_names(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    device_id, key = await register(api)
    await add_subscriber(api, channel_name, device_id=device_id)
    async with open_device(server, key) as device:
        resumed = await device.recv()
        assert resumed["op"] == "subscribed"
        first = await api.publish_many(channel_name, 2)
        assert await device.message_ids(2) == first
    missed = await api.publish_many(channel_name, 3)
    async with open_socket(server) as device:
        point = {"channel": channel_name, "since": first[-1], **resumed["position"]}
        del point["offset"]
        answer = await device.request(
            {"op": "connect", "id": 1, "connection_key": key, "resume": [point]}
        )
        assert answer["op"] == "connected"
        again = await device.recv()
        assert (again["op"], again["recovered"]) == ("subscribed", True)
        assert await device.message_ids(3) == missed
        await device.assert_idle()
    async with open_socket(server) as device:
        bad = await device.request(
            {"op": "connect", "id": 1, "connection_key": key, "resume": [{"channel": "x"}]}
        )
        assert (bad["op"], bad["path"]) == ("error", "resume[0].since")


async def test_audience_applies_to_websocket_publishes_too(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    keys = {}
    for tag in ("red", "blue"):
        device_id, keys[tag] = await register(api, tags=[tag])
        await add_subscriber(api, channel_name, device_id=device_id)
    async with (
        open_device(server, keys["red"]) as red,
        open_device(server, keys["blue"]) as blue,
        open_client(server) as publisher,
    ):
        for device in (red, blue):
            assert (await device.recv())["op"] == "subscribed"
        answer = await publisher.request(
            {
                "op": "publish",
                "id": 1,
                "channel": channel_name,
                "payload": "red only",
                "audience": {"tag": "red"},
            }
        )
        assert answer["op"] == "published"
        assert [m["payload"] for m in await red.messages(1)] == ["red only"]
        await blue.assert_idle()
        wrong = await publisher.request(
            {"op": "publish", "id": 2, "channel": channel_name, "payload": 1, "audience": 5}
        )
        assert (wrong["op"], wrong["path"]) == ("error", "audience")
