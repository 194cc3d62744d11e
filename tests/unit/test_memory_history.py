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
    gc.collect()
    stream = engine._streams[channel.topic()]
    assert not any(gc.is_tracked(entry) for entry in list(stream.messages)[:50])
    assert await engine.history(channel.topic(), limit=100) == [*published, odd]
    recovered = await engine.recover(channel.topic(), published[47].id)
    assert recovered.messages == [published[48], published[49], odd]
