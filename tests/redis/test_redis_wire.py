"""The raw pub/sub connections (`herald.engines.redis_wire`) against a real redis-server."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from herald.engines import redis_wire
from herald.engines.redis import RedisEngine
from herald.engines.redis_wire import RespConnection, connect, endpoint_from_url
from herald.models import Channel, Message
from tests.support import RedisProcess, wait_until


def test_endpoints_from_urls() -> None:
    plain = endpoint_from_url("redis://127.0.0.1:7001/3")
    assert (plain.host, plain.port, plain.password, plain.tls, plain.path) == (
        "127.0.0.1",
        7001,
        None,
        None,
        None,
    )
    login = endpoint_from_url("redis://user:p%40ss@example.org")
    assert (login.host, login.port, login.username, login.password) == (
        "example.org",
        6379,
        "user",
        "p@ss",
    )
    assert endpoint_from_url("redis://:secret@h").username is None
    assert plain.db == 3
    assert endpoint_from_url("redis://h?db=5").db == 5
    assert endpoint_from_url("redis://h/").db == 0
    tls = endpoint_from_url("rediss://h:6380")
    assert tls.tls is not None
    assert tls.tls.verify_mode == ssl.CERT_REQUIRED
    lax = endpoint_from_url("rediss://h?ssl_cert_reqs=none")
    assert lax.tls is not None
    assert lax.tls.verify_mode == ssl.CERT_NONE
    assert endpoint_from_url("unix:///run/redis.sock").path == "/run/redis.sock"
    with pytest.raises(ValueError, match="not a Redis URL"):
        endpoint_from_url("http://h")


@pytest.fixture
async def publisher(fresh_redis: RedisProcess) -> AsyncIterator[Redis]:
    """A plain redis-py client on the test's redis-server."""
    client = Redis.from_url(fresh_redis.url)
    yield client
    await client.aclose()


async def _subscribed(fresh_redis: RedisProcess, *channels: bytes) -> RespConnection:
    connection = await connect(endpoint_from_url(fresh_redis.url))
    connection.send("SUBSCRIBE", *channels)
    confirmed: list[Any] = []
    while len(confirmed) < len(channels):
        confirmed += await connection.inbox.take()
    assert [reply[0] for reply in confirmed] == [b"subscribe"] * len(channels)
    return connection


async def test_one_read_hands_over_every_reply_it_brought(
    fresh_redis: RedisProcess, publisher: Redis
) -> None:
    connection = await _subscribed(fresh_redis, b"t")
    try:
        async with publisher.pipeline(transaction=False) as pipe:
            for n in range(2000):
                pipe.publish("t", str(n))
            await pipe.execute()
        batches: list[list[Any]] = []
        while sum(len(batch) for batch in batches) < 2000:
            batches.append(await connection.inbox.take())
        got = [reply for batch in batches for reply in batch]
        assert got == [[b"message", b"t", str(n).encode()] for n in range(2000)]
        # Far fewer wake-ups than messages: that is the point of reading in batches.
        assert len(batches) < 200
    finally:
        connection.close()


async def test_a_reader_that_falls_behind_stops_reading_instead_of_buffering(
    fresh_redis: RedisProcess, publisher: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A threshold a few thousand messages pass; the real one is 50,000 replies.
    monkeypatch.setattr(redis_wire, "_HIGH_WATER", 100)
    connection = await _subscribed(fresh_redis, b"t")
    inbox = connection.inbox
    try:
        payload = "x" * 1000
        async with publisher.pipeline(transaction=False) as pipe:
            for _ in range(3000):
                pipe.publish("t", payload)
            await pipe.execute()

        # Not read: the rest waits in the socket and in Redis, not in this process.
        held = -1
        while held != len(inbox._replies):
            held = len(inbox._replies)
            await asyncio.sleep(0.3)
        assert 100 < held < 1000
        got = 0
        while got < 3000:
            got += len(await inbox.take())
        assert got == 3000
    finally:
        connection.close()


async def test_a_lost_connection_is_raised_after_what_came_before(
    fresh_redis: RedisProcess, publisher: Redis
) -> None:
    connection = await _subscribed(fresh_redis, b"t")
    await publisher.publish("t", "last words")
    await fresh_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    replies: list[Any] = []

    async def read_all() -> None:
        while True:
            replies.extend(await connection.inbox.take())

    with pytest.raises(ConnectionError):
        await read_all()
    assert replies == [[b"message", b"t", b"last words"]]


async def test_an_error_reply_fails_the_link(fresh_redis: RedisProcess) -> None:
    connection = await _subscribed(fresh_redis, b"t")
    try:
        connection.send("GET", "k")  # not allowed in subscribed mode
        with pytest.raises(ConnectionError, match="Redis answered with an error"):
            await connection.inbox.take()
    finally:
        connection.close()


async def test_the_engine_logs_in_to_a_redis_with_a_password(
    fresh_redis: RedisProcess,
) -> None:
    await fresh_redis.cli("CONFIG", "SET", "requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{fresh_redis.port}/0"
    delivered: list[Message] = []
    engine = RedisEngine(url)
    await engine.start(delivered.append)
    try:
        channel = Channel(app="a", name="c")
        await engine.subscribe(channel.topic())
        draft = Message("", "a", "c", "", "hi", {"type": "key", "id": "k"}, "")
        stored = await engine.publish(channel, draft)

        async def arrived() -> bool:
            return [m.id for m in delivered] == [stored.id]

        await wait_until(arrived)
    finally:
        await engine.close()
    wrong = endpoint_from_url(f"redis://:nope@127.0.0.1:{fresh_redis.port}")
    with pytest.raises(ConnectionError, match=r"WRONGPASS|invalid"):
        await asyncio.wait_for(connect(wrong), 5)
