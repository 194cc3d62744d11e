"""The WebSocket protocol end to end: a real ``herald serve``, real clients, HTTP publishers.

Covers connecting in both encodings, subscribing, live delivery in publish
order, unsubscribe, ping, publishing over the socket, and recovery with
``since`` — including the race between a subscribe and a running publisher,
which must leave no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from herald.models import offset_key
from tests.e2e.conftest import JSON, MSGPACK, Api, open_client, open_socket
from tests.support import ServerProcess, scaled

ENCODINGS = [pytest.param(JSON, id="json"), pytest.param(MSGPACK, id="msgpack")]
AUTHOR = {"type": "key", "id": "bootstrap"}
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_connect_answers_connected(server: ServerProcess, encoding: str) -> None:
    async with open_socket(server, encoding) as client:
        answer = await client.request({"op": "connect", "id": 41, "key": server.key})
    assert set(answer) == {"op", "id", "client_id", "ping_interval", "server"}
    assert answer["op"] == "connected"
    assert answer["id"] == 41
    assert isinstance(answer["client_id"], str)
    assert answer["client_id"].startswith(answer["server"] + "/")
    assert answer["ping_interval"] == 25.0
    assert isinstance(answer["server"], str)
    assert answer["server"]


async def test_client_ids_differ(server: ServerProcess) -> None:
    async with open_client(server) as first, open_client(server, MSGPACK) as second:
        assert first.connected["client_id"] != second.connected["client_id"]
        assert first.connected["server"] == second.connected["server"]


async def test_second_connect_is_a_bad_frame(server: ServerProcess) -> None:
    async with open_client(server) as client:
        answer = await client.request({"op": "connect", "id": 2, "key": server.key})
        assert answer == {
            "op": "error",
            "id": 2,
            "code": "bad_frame",
            "detail": "already connected",
            "path": "op",
        }
        await client.assert_idle()


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_subscribe_then_receive_a_message(
    server: ServerProcess, api: Api, channel_name: str, encoding: str
) -> None:
    await api.create_channel(channel_name)
    async with open_client(server, encoding) as client:
        answer = await client.subscribe(channel_name)
        assert answer == {
            "op": "subscribed",
            "id": answer["id"],
            "channel": channel_name,
            "room": "",
            "position": {"offset": "0-0", "epoch": answer["position"]["epoch"]},
        }
        assert isinstance(answer["position"]["epoch"], str)
        assert answer["position"]["epoch"]
        message_id = await api.publish(
            channel_name, {"text": "hello", "n": [1, 2.5, None, True]}, metadata={"k": "v"}
        )
        frame = await client.recv()
    assert frame == {
        "op": "message",
        "channel": channel_name,
        "room": "",
        "id": message_id,
        "payload": {"text": "hello", "n": [1, 2.5, None, True]},
        "author": AUTHOR,
        "created_at": frame["created_at"],
        "metadata": {"k": "v"},
    }
    assert CREATED_AT.fullmatch(frame["created_at"])


async def test_subscribed_position_is_the_newest_id(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    ids = await api.publish_many(channel_name, 3)
    async with open_client(server) as client:
        answer = await client.subscribe(channel_name)
        assert answer["position"]["offset"] == ids[-1]
        assert "recovered" not in answer
        # Without since, nothing from history is replayed.
        await client.assert_idle()


async def test_messages_arrive_in_publish_order(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    async with open_client(server) as client:
        await client.subscribe(channel_name)
        ids = await api.publish_many(channel_name, 100)
        frames = await client.messages(100)
        await client.assert_idle()
    assert [f["id"] for f in frames] == ids
    assert [f["payload"] for f in frames] == [{"n": i} for i in range(100)]


async def test_every_subscriber_receives(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    async with (
        open_client(server, JSON) as first,
        open_client(server, MSGPACK) as second,
        open_client(server, JSON) as third,
    ):
        for client in (first, second, third):
            await client.subscribe(channel_name)
        ids = await api.publish_many(channel_name, 5)
        for client in (first, second, third):
            assert await client.message_ids(5) == ids
            await client.assert_idle()


async def test_unsubscribe_stops_delivery(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    async with open_client(server) as client, open_client(server) as witness:
        await client.subscribe(channel_name)
        await witness.subscribe(channel_name)
        first = await api.publish(channel_name, "before")
        assert await client.message_ids(1) == [first]
        answer = await client.request({"op": "unsubscribe", "id": "u1", "channel": channel_name})
        assert answer == {"op": "unsubscribed", "id": "u1", "channel": channel_name, "room": ""}
        second = await api.publish(channel_name, "after")
        await client.assert_idle()
        assert await witness.message_ids(2) == [first, second]
        # Unsubscribing again names the mistake and keeps the connection.
        again = await client.request({"op": "unsubscribe", "id": "u2", "channel": channel_name})
        assert again["op"] == "error"
        assert again["id"] == "u2"
        assert again["code"] == "not_found"
        await client.assert_idle()


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_ping_pong(server: ServerProcess, encoding: str) -> None:
    async with open_client(server, encoding) as client:
        assert await client.request({"op": "ping", "id": "p-1"}) == {"op": "pong", "id": "p-1"}
        assert await client.request({"op": "ping", "id": 7}) == {"op": "pong", "id": 7}
        assert await client.request({"op": "ping"}) == {"op": "pong"}


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_publish_over_websocket(
    server: ServerProcess, api: Api, channel_name: str, encoding: str
) -> None:
    await api.create_channel(channel_name)
    async with open_client(server, encoding) as publisher, open_client(server) as subscriber:
        await subscriber.subscribe(channel_name)
        answer = await publisher.request(
            {"op": "publish", "id": "pub-1", "channel": channel_name, "payload": {"from": "ws"}}
        )
        assert set(answer) == {"op", "id", "message_id"}
        assert answer["op"] == "published"
        assert answer["id"] == "pub-1"
        frame = await subscriber.recv()
        assert frame == {
            "op": "message",
            "channel": channel_name,
            "room": "",
            "id": answer["message_id"],
            "payload": {"from": "ws"},
            "author": AUTHOR,
            "created_at": frame["created_at"],
        }
        await publisher.assert_idle()
    assert await api.history_ids(channel_name) == [answer["message_id"]]


async def test_subscribe_since_replays_then_goes_live(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    ids = await api.publish_many(channel_name, 5)
    async with open_client(server) as client:
        answer = await client.subscribe(channel_name, since=ids[1])
        assert answer["recovered"] is True
        assert answer["position"]["offset"] == ids[-1]
        replayed = await client.messages(3)
        assert [f["id"] for f in replayed] == ids[2:]
        assert [f["payload"] for f in replayed] == [{"n": 2}, {"n": 3}, {"n": 4}]
        live = await api.publish_many(channel_name, 2)
        assert await client.message_ids(2) == live
        await client.assert_idle()


async def test_subscribe_since_the_newest_id_replays_nothing(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    ids = await api.publish_many(channel_name, 3)
    async with open_client(server) as client:
        answer = await client.subscribe(channel_name, since=ids[-1])
        assert answer["recovered"] is True
        assert answer["position"]["offset"] == ids[-1]
        await client.assert_idle()


async def test_subscribe_since_older_than_history_is_not_recovered(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name, history_size=5)
    ids = await api.publish_many(channel_name, 20)
    async with open_client(server) as client:
        answer = await client.subscribe(channel_name, since=ids[0])
        assert answer["recovered"] is False
        assert answer["position"]["offset"] == ids[-1]
        # What is still retained is replayed all the same.
        assert await client.message_ids(5) == ids[-5:]
        await client.assert_idle()


@pytest.mark.parametrize("attempt", range(3))
async def test_subscribe_since_while_publishing_has_no_gap_and_no_duplicate(
    server: ServerProcess, api: Api, channel_name: str, attempt: int
) -> None:
    total = 300
    await api.create_channel(channel_name, history_size=1000)
    before = await api.publish_many(channel_name, 10)
    since = before[4]
    started = asyncio.Event()
    published: list[str] = []

    async def publisher() -> None:
        for i in range(total):
            published.append(await api.publish(channel_name, {"n": i}))
            started.set()

    async with open_client(server) as client:
        task = asyncio.create_task(publisher())
        try:
            async with asyncio.timeout(scaled(10)):
                # Let a few publishes land, so the subscribe meets a publisher in full flow.
                await started.wait()
            answer = await client.subscribe(channel_name, since=since)
            assert answer["recovered"] is True
            position = answer["position"]["offset"]
            received: list[str] = []
            async with asyncio.timeout(scaled(20)):
                await task
                last = published[-1]
                while not received or received[-1] != last:
                    frame = await client.recv()
                    assert frame["op"] == "message", frame
                    received.append(frame["id"])
            await client.assert_idle()
        finally:
            task.cancel()
    expected = await api.history_ids(channel_name, since=since)
    assert expected == before[5:] + published
    # The subscribe landed while the publisher was still at work.
    assert position in published[:-1]
    assert len(received) == len(set(received))
    assert received == expected
    keys = [offset_key(i) for i in received]
    assert keys == sorted(keys)


async def test_separate_rooms_subscribe_needs_a_room(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name, type="separate_rooms")
    async with open_client(server) as client:
        answer = await client.request({"op": "subscribe", "id": 3, "channel": channel_name})
        assert answer["op"] == "error"
        assert answer["id"] == 3
        assert answer["code"] == "bad_request"
        assert answer["path"] == "room"
        subscribed = await client.subscribe(channel_name, room="kitchen")
        assert subscribed["room"] == "kitchen"
        await api.publish(channel_name, "elsewhere", room="hall")
        here = await api.publish(channel_name, "here", room="kitchen")
        frames = await client.messages(1)
        assert frames[0]["id"] == here
        assert frames[0]["room"] == "kitchen"
        assert frames[0]["payload"] == "here"
        await client.assert_idle()


async def test_default_channel_subscribe_rejects_a_room(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    async with open_client(server) as client:
        answer = await client.request(
            {"op": "subscribe", "id": "r", "channel": channel_name, "room": "kitchen"}
        )
        assert answer["op"] == "error"
        assert answer["code"] == "bad_request"
        assert answer["path"] == "room"
        await client.assert_idle()


async def test_subscribe_to_an_unknown_channel_keeps_the_connection(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    async with open_client(server) as client:
        answer = await client.request(
            {"op": "subscribe", "id": "nope", "channel": f"{channel_name}-missing"}
        )
        assert answer == {"op": "error", "id": "nope", "code": "not_found", "detail": "Not found"}
        await client.assert_idle()
        await api.create_channel(channel_name)
        await client.subscribe(channel_name)
        message_id = await api.publish(channel_name, 1)
        assert await client.message_ids(1) == [message_id]


async def test_subscribing_twice_is_idempotent_but_not_with_since(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    await api.create_channel(channel_name)
    async with open_client(server) as client:
        await client.subscribe(channel_name)
        again = await client.subscribe(channel_name)
        assert again["position"]["offset"] == "0-0"
        answer = await client.request(
            {"op": "subscribe", "id": "again", "channel": channel_name, "since": "0-0"}
        )
        assert answer["op"] == "error"
        assert answer["code"] == "conflict"
        message_id = await api.publish(channel_name, 1)
        # Still subscribed once: one copy of each message.
        assert await client.message_ids(1) == [message_id]
        await client.assert_idle()


async def test_pipelined_publishes_keep_their_order(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    # A client may send many publish frames without waiting for the answers: each
    # gets its `published`, and the channel keeps them in the order they were sent.
    await api.create_channel(channel_name, history_size=1000)
    async with open_client(server) as publisher, open_client(server) as listener:
        await listener.subscribe(channel_name)
        for n in range(300):
            await publisher.send(
                {"op": "publish", "id": n, "channel": channel_name, "payload": {"n": n}}
            )
        answers = [await publisher.recv() for _ in range(300)]
        assert all(answer["op"] == "published" for answer in answers), answers[:3]
        assert sorted(answer["id"] for answer in answers) == list(range(300))
        by_request = {answer["id"]: answer["message_id"] for answer in answers}
        expected = [by_request[n] for n in range(300)]
        assert await listener.message_ids(300) == expected
        assert await api.history_ids(channel_name) == expected
