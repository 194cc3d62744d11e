"""The memory engine's history: what it retains stays out of the garbage collector's walks."""

from __future__ import annotations

import gc

from herald.engines import MemoryEngine
from herald.models import Channel, Message


def _draft(channel: Channel, payload: object, author: dict[str, str]) -> Message:
    return Message("", channel.app, channel.name, "", payload, author, "")


async def test_retained_messages_are_untracked_and_read_back_whole() -> None:
    # A busy worker retains up to history_size messages per topic, hundreds of thousands
    # in all: as tracked objects, every older collection walked each one again.
    engine = MemoryEngine()
    await engine.start(lambda message: None)
    channel = Channel(app="app", name="news")
    await engine.create_channel(channel)
    published = [
        await engine.publish(channel, _draft(channel, f"text {n}", {"type": "key", "id": "k1"}))
        for n in range(50)
    ]
    odd = await engine.publish(
        channel, _draft(channel, {"nested": [1]}, {"type": "user", "id": "u", "extra": "x"})
    )
    stream = engine._streams[channel.topic()]
    assert not any(gc.is_tracked(entry) for entry in stream.messages)  # nested payload too
    assert await engine.history(channel.topic(), limit=100) == [*published, odd]
    recovered = await engine.recover(channel.topic(), published[47].id)
    assert recovered.messages == [published[48], published[49], odd]


async def test_publishing_leaves_nothing_for_the_collector() -> None:
    # Each tracked object a publish leaves behind brings the next young collection
    # closer; with 10,000 connections in the worker one takes tens of milliseconds.
    engine = MemoryEngine()
    await engine.start(lambda message: None)
    channel = Channel(app="app", name="news", history_size=100)
    await engine.create_channel(channel)
    author = {"type": "key", "id": "k1"}
    await engine.publish(channel, _draft(channel, "first", author))  # the stream exists now
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for n in range(500):  # past history_size: trimming included
            await engine.publish(channel, _draft(channel, {"n": n, "list": [n]}, author))
        left = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert left < 10
