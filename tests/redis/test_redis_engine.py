"""What only the Redis engine does: script caching, layout in Redis, outages at engine level.

The engine contract (tests/contract) covers the behaviour both engines share.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest

from herald.engines.redis import RedisEngine
from herald.errors import Unavailable
from herald.models import Channel, Device, Message, Topic, offset_key
from tests.support import RedisProcess, wait_until


def _draft(topic: Topic, payload: object) -> Message:
    return Message(
        "", topic.app, topic.channel, topic.room, payload, {"type": "key", "id": "k"}, ""
    )


@pytest.fixture
async def engine(fresh_redis: RedisProcess) -> AsyncIterator[RedisEngine]:
    """A started Redis engine on the test's own redis-server."""
    delivered: list[Message] = []
    built = RedisEngine(fresh_redis.url)
    await built.start(delivered.append)
    yield built
    await built.close()


async def test_publish_survives_redis_forgetting_its_scripts(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    channel = Channel(app="a", name="c")
    first = await engine.publish(channel, _draft(channel.topic(), 1))
    # A Redis restart without persistence forgets loaded scripts (NOSCRIPT).
    assert (await fresh_redis.cli("SCRIPT", "FLUSH")).strip() == "OK"
    second = await engine.publish(channel, _draft(channel.topic(), 2))
    history = await engine.history(channel.topic())
    assert [m.id for m in history] == [first.id, second.id]


async def test_concurrent_publishes_share_pipelines(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    channel = Channel(app="a", name="c", history_size=500)
    await fresh_redis.cli("CONFIG", "RESETSTAT")
    published = await asyncio.gather(
        *(engine.publish(channel, _draft(channel.topic(), n)) for n in range(200))
    )
    assert [m.payload for m in published] == list(range(200))
    stats = await fresh_redis.cli("INFO", "commandstats")

    def calls(command: str) -> int:
        line = next(line for line in stats.splitlines() if line.startswith(f"cmdstat_{command}:"))
        return int(line.split("calls=")[1].split(",")[0])

    # Publishes queued together share a script call per topic, and its one PUBLISH;
    # the message counter is bumped once per channel per pipeline.
    # One XADD a message, and one more that found the stream not made yet (NOMKSTREAM).
    assert calls("xadd") == 201
    assert calls("evalsha") < 200
    assert calls("publish") == calls("evalsha")
    assert calls("hincrby") == calls("evalsha")
    assert [m.id for m in await engine.history(channel.topic(), limit=500)] == [
        m.id for m in published
    ]
    assert (await engine.get_channel("a", "c")) is None  # the counter alone is no record
    assert (await fresh_redis.cli("HGET", "herald:{a}:chn", "c")).strip() == "200"


def _calls(stats: str, command: str) -> int:
    """How many times ``command`` ran, from ``INFO commandstats`` (0 if never)."""
    for line in stats.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_a_publish_to_a_full_history_adds_and_trims_in_one_command(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    channel = Channel(app="a", name="c", history_size=3)
    topic = channel.topic()
    published = [await engine.publish(channel, _draft(topic, n)) for n in range(6)]
    await fresh_redis.cli("CONFIG", "RESETSTAT")

    published.append(await engine.publish(channel, _draft(topic, 6)))

    # The XADD trims; no read of the oldest entry nor a trim point written per publish.
    stats = await fresh_redis.cli("INFO", "commandstats")
    assert _calls(stats, "xadd") == 1
    for command in ("xrange", "xtrim", "hset", "hsetnx", "hget"):
        assert _calls(stats, command) == 0, command
    # The stream holds one entry more: the newest one trimmed from the history.
    assert (await fresh_redis.cli("XLEN", "herald:{a|c|}:s")).strip() == "4"
    assert [m.id for m in await engine.history(topic, size=3)] == [m.id for m in published[-3:]]
    point = await engine.recover(topic, published[-4].id)
    assert (point.recovered, point.messages) == (True, published[-3:])
    for since in (published[-5].id, "0-0"):
        assert (await engine.recover(topic, since)).recovered is False, since


async def test_a_lost_stream_is_not_taken_for_a_fresh_one(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    channel = Channel(app="a", name="c")
    topic = channel.topic()
    published = [await engine.publish(channel, _draft(topic, n)) for n in range(3)]
    # Evicted or deleted while its meta hash stays: messages 1 and 2 are gone.
    await fresh_redis.cli("DEL", "herald:{a|c|}:s")

    fresh = await engine.publish(channel, _draft(topic, 3))

    for since in ("0-0", published[0].id, published[1].id):
        recovery = await engine.recover(topic, since)
        assert (recovery.recovered, recovery.messages) == (False, [fresh]), since
    assert (await engine.recover(topic, fresh.id)).recovered is True


async def test_publishes_to_many_topics_share_script_calls(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    # One call carries up to 100 topics: 250 topics with 2 messages each (grouped by
    # topic, queued together) take 3 calls, with one PUBLISH per topic.
    channels = [Channel(app="a", name=f"c{n}", history_size=1) for n in range(250)]
    await fresh_redis.cli("CONFIG", "RESETSTAT")
    published = await engine.publish_many(
        [
            (channel, _draft(channel.topic(), f"{channel.name}/{n}"))
            for n in (1, 2)
            for channel in channels
        ]
    )
    stats = await fresh_redis.cli("INFO", "commandstats")

    def calls(command: str) -> int:
        line = next(line for line in stats.splitlines() if line.startswith(f"cmdstat_{command}:"))
        return int(line.split("calls=")[1].split(",")[0])

    assert calls("xadd") == 500 + 250  # each new stream: a NOMKSTREAM try first
    assert calls("evalsha") == 3
    assert calls("publish") == 250
    for channel in channels:
        # history_size 1: each topic trimmed to its second message, in order.
        [kept] = await engine.history(channel.topic(), size=1)
        assert kept.payload == f"{channel.name}/2"
        first, second = (m for m in published if m.channel == channel.name)
        assert offset_key(first.id) < offset_key(second.id)
        assert kept.id == second.id


async def test_publish_while_redis_is_down_is_unavailable(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    channel = Channel(app="a", name="c")
    fresh_redis.kill()
    with pytest.raises(Unavailable):
        await engine.publish(channel, _draft(channel.topic(), "lost"))
    with pytest.raises(Unavailable):
        await engine.ping()
    fresh_redis.start()
    # Without persistence nothing came back; the engine works again all the same.

    async def ready() -> bool:
        try:
            await engine.ping()
        except Unavailable:
            return False
        return True

    await wait_until(ready)
    stored = await engine.publish(channel, _draft(channel.topic(), "kept"))
    assert [m.id for m in await engine.history(channel.topic())] == [stored.id]


async def test_publishes_go_to_the_database_the_url_names(fresh_redis: RedisProcess) -> None:
    engine = RedisEngine(f"redis://127.0.0.1:{fresh_redis.port}/3")
    await engine.start(lambda message: None)
    try:
        channel = Channel(app="a", name="c")
        stored = await engine.publish(channel, _draft(channel.topic(), "in db 3"))
        assert [m.id for m in await engine.history(channel.topic())] == [stored.id]
    finally:
        await engine.close()
    assert (await fresh_redis.cli("-n", "3", "XLEN", "herald:{a|c|}:s")).strip() == "1"
    assert (await fresh_redis.cli("-n", "0", "DBSIZE")).strip() == "0"


async def test_a_redis_that_hangs_makes_publishes_unavailable_not_stuck(
    engine: RedisEngine, fresh_redis: RedisProcess
) -> None:
    channel = Channel(app="a", name="c")
    first = await engine.publish(channel, _draft(channel.topic(), "before"))
    assert fresh_redis.proc is not None
    fresh_redis.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await engine.publish(channel, _draft(channel.topic(), "while hung"))
        assert time.monotonic() - started < 8
    finally:
        fresh_redis.proc.send_signal(signal.SIGCONT)
    # The pipeline's connection was dropped (its replies could be mistaken for the next
    # one's): the next publish opens a new one. The one that timed out may or may not
    # have been stored (it was sent), as with any client of a server that stops answering.
    last = await engine.publish(channel, _draft(channel.topic(), "after"))
    history = await engine.history(channel.topic())
    assert [history[0].id, history[-1].id] == [first.id, last.id]
    assert [m.payload for m in history] in (["before", "after"], ["before", "while hung", "after"])


async def test_address_of_a_half_written_device_is_free(engine: RedisEngine) -> None:
    # Only a shared store can hold an index entry without its record (a write cut short).
    lost = Device(id="dev-lost", app="halves", address="token-1", platform="ios")
    await engine.add_device(lost)
    await engine.redis.delete("herald:{halves}:dev:dev-lost")

    fresh = Device(id="dev-fresh", app="halves", address="token-1", platform="ios")
    assert await engine.add_device(fresh) is None
    assert await engine.find_device("halves", "ios", "token-1") == fresh


async def test_unsubscribing_leaves_no_bookkeeping_behind(engine: RedisEngine) -> None:
    topics = [Topic("a", f"churn{n}") for n in range(50)]
    for _ in range(3):
        for topic in topics:
            await engine.subscribe(topic)
        for topic in topics:
            await engine.unsubscribe(topic)

    async def confirmed() -> bool:
        return not engine._leaving

    # Every UNSUBSCRIBE Redis confirms settles its entry: churn does not grow memory.
    await wait_until(confirmed)
