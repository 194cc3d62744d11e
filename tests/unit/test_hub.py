"""Local fan-out: encode once per encoding, buffer while catching up, flush once per iteration."""

from __future__ import annotations

import asyncio
import time

import msgpack
import orjson
import pytest

from herald.hub import Hub
from herald.models import Device, Message, Topic
from herald.protocol import Encoding, encode, message_frame, ws_frame

NEWS = Topic("app", "news")
OTHER = Topic("app", "other")


class Recorder:
    """A subscriber that keeps every frame the hub pushes and counts its flushes."""

    def __init__(self, encoding: Encoding, device: Device | None = None) -> None:
        self.encoding = encoding
        self.device = device
        self.frames: list[bytes] = []
        self.flushes = 0

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def flush(self) -> None:
        self.flushes += 1


def message(seq: int, topic: Topic = NEWS) -> Message:
    """A stored message with id ``1000-<seq>`` on ``topic``."""
    return Message(
        id=f"1000-{seq}",
        app=topic.app,
        channel=topic.channel,
        room=topic.room,
        payload={"n": seq},
        author={"type": "key", "id": "k1"},
        created_at="2024-01-01T00:00:00.000000Z",
    )


def payload_of(frame: bytes) -> bytes:
    """The payload of one unmasked server frame, checking its length field."""
    length, start = frame[1], 2
    if length == 126:
        length, start = int.from_bytes(frame[2:4]), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10]), 10
    assert len(frame) == start + length
    return frame[start:]


def live(hub: Hub, topic: Topic, subscriber: Recorder) -> None:
    """Subscribe the way the node does: begin, then activate with nothing to replay."""
    hub.begin(topic, subscriber)
    assert hub.activate(topic, subscriber, "0-0") == []


def test_deliver_encodes_once_per_encoding() -> None:
    hub = Hub()
    json_a, json_b = Recorder(Encoding.JSON), Recorder(Encoding.JSON)
    pack_a, pack_b = Recorder(Encoding.MSGPACK), Recorder(Encoding.MSGPACK)
    for subscriber in (json_a, json_b, pack_a, pack_b):
        live(hub, NEWS, subscriber)
    sent = message(1)

    hub.deliver(sent)

    assert len(json_a.frames) == len(json_b.frames) == 1
    assert len(pack_a.frames) == len(pack_b.frames) == 1
    # Identity, not equality: one encoding per message is the whole point of the hub.
    assert json_a.frames[0] is json_b.frames[0]
    assert pack_a.frames[0] is pack_b.frames[0]
    expected = message_frame(sent)
    assert json_a.frames[0] == ws_frame(encode(expected, Encoding.JSON), binary=False)
    assert pack_a.frames[0] == ws_frame(encode(expected, Encoding.MSGPACK), binary=True)


def test_deliver_frames_carry_the_message() -> None:
    hub = Hub()
    as_json, as_msgpack = Recorder(Encoding.JSON), Recorder(Encoding.MSGPACK)
    live(hub, NEWS, as_json)
    live(hub, NEWS, as_msgpack)

    hub.deliver(message(3))

    expected = {
        "op": "message",
        "channel": "news",
        "room": "",
        "id": "1000-3",
        "payload": {"n": 3},
        "author": {"type": "key", "id": "k1"},
        "created_at": "2024-01-01T00:00:00.000000Z",
    }
    text, binary = as_json.frames[0], as_msgpack.frames[0]
    assert text[0] == 0x81
    assert orjson.loads(payload_of(text)) == expected
    assert binary[0] == 0x82
    assert msgpack.unpackb(payload_of(binary), raw=False) == expected


def test_deliver_reaches_only_the_message_topic() -> None:
    hub = Hub()
    news, other = Recorder(Encoding.JSON), Recorder(Encoding.JSON)
    live(hub, NEWS, news)
    live(hub, OTHER, other)

    hub.deliver(message(1, NEWS))
    hub.deliver(message(2, Topic("app", "nobody-listens")))

    assert len(news.frames) == 1
    assert other.frames == []


def test_deliver_keeps_order() -> None:
    hub = Hub()
    subscriber = Recorder(Encoding.JSON)
    live(hub, NEWS, subscriber)

    for seq in range(5):
        hub.deliver(message(seq))

    assert [orjson.loads(payload_of(f))["id"] for f in subscriber.frames] == [
        f"1000-{seq}" for seq in range(5)
    ]


def test_pending_subscriber_buffers_instead_of_receiving() -> None:
    hub = Hub()
    catching_up = Recorder(Encoding.JSON)
    hub.begin(NEWS, catching_up)

    hub.deliver(message(1))
    hub.deliver(message(2))

    assert catching_up.frames == []
    assert hub.subscribers(NEWS) == 1


def test_activate_returns_only_messages_after_the_given_id() -> None:
    hub = Hub()
    catching_up = Recorder(Encoding.MSGPACK)
    hub.begin(NEWS, catching_up)
    for seq in (1, 2, 3, 4):
        hub.deliver(message(seq))

    # The replay from history already covered up to 1000-2.
    missed = hub.activate(NEWS, catching_up, "1000-2")

    assert [m.id for m in missed] == ["1000-3", "1000-4"]
    assert catching_up.frames == []


def test_activate_compares_ids_numerically() -> None:
    hub = Hub()
    catching_up = Recorder(Encoding.JSON)
    hub.begin(NEWS, catching_up)
    hub.deliver(message(9))
    hub.deliver(message(10))

    # As strings "1000-10" < "1000-9"; as ids 10 comes after 9.
    assert [m.id for m in hub.activate(NEWS, catching_up, "1000-9")] == ["1000-10"]


def test_activated_subscriber_receives_live_messages() -> None:
    hub = Hub()
    subscriber = Recorder(Encoding.JSON)
    hub.begin(NEWS, subscriber)
    hub.deliver(message(1))
    assert [m.id for m in hub.activate(NEWS, subscriber, "0-0")] == ["1000-1"]

    hub.deliver(message(2))

    assert len(subscriber.frames) == 1
    assert orjson.loads(payload_of(subscriber.frames[0]))["id"] == "1000-2"


def test_remove_live_subscriber() -> None:
    hub = Hub()
    leaving, staying = Recorder(Encoding.JSON), Recorder(Encoding.MSGPACK)
    live(hub, NEWS, leaving)
    live(hub, NEWS, staying)

    hub.remove(NEWS, leaving)
    hub.deliver(message(1))

    assert leaving.frames == []
    assert len(staying.frames) == 1
    assert hub.subscribers(NEWS) == 1


def test_remove_pending_subscriber() -> None:
    hub = Hub()
    pending, staying = Recorder(Encoding.JSON), Recorder(Encoding.JSON)
    hub.begin(NEWS, pending)
    live(hub, NEWS, staying)

    hub.remove(NEWS, pending)
    hub.deliver(message(1))

    assert pending.frames == []
    assert len(staying.frames) == 1
    assert hub.subscribers(NEWS) == 1


def test_remove_pending_subscriber_with_nothing_buffered_leaves_live_ones() -> None:
    hub = Hub()
    subscriber = Recorder(Encoding.JSON)
    live(hub, NEWS, subscriber)
    # Subscribing to a second room of the same connection must not disturb the first.
    hub.begin(OTHER, subscriber)

    hub.remove(OTHER, subscriber)
    hub.deliver(message(1))

    assert len(subscriber.frames) == 1
    assert hub.subscribers(NEWS) == 1
    assert hub.subscribers(OTHER) == 0


def test_remove_absent_subscriber_is_a_no_op() -> None:
    hub = Hub()
    present, absent = Recorder(Encoding.JSON), Recorder(Encoding.JSON)
    live(hub, NEWS, present)

    hub.remove(NEWS, absent)
    hub.remove(OTHER, absent)

    assert hub.subscribers(NEWS) == 1
    assert len(hub) == 1


def test_empty_topics_are_dropped() -> None:
    hub = Hub()
    a, b = Recorder(Encoding.JSON), Recorder(Encoding.MSGPACK)
    live(hub, NEWS, a)
    hub.begin(NEWS, b)
    live(hub, OTHER, a)
    assert len(hub) == 2

    hub.remove(NEWS, a)
    assert len(hub) == 2
    hub.remove(NEWS, b)
    assert len(hub) == 1
    assert hub.subscribers(NEWS) == 0
    hub.remove(OTHER, a)
    assert len(hub) == 0


async def test_schedule_flush_flushes_once_per_loop_iteration() -> None:
    hub = Hub()
    busy, quiet = Recorder(Encoding.JSON), Recorder(Encoding.MSGPACK)

    for _ in range(5):
        hub.schedule_flush(busy)
    hub.schedule_flush(quiet)
    # Nothing is written until the current callback returns to the loop.
    assert (busy.flushes, quiet.flushes) == (0, 0)

    await asyncio.sleep(0)
    assert (busy.flushes, quiet.flushes) == (1, 1)

    await asyncio.sleep(0)
    assert (busy.flushes, quiet.flushes) == (1, 1)

    hub.schedule_flush(busy)
    hub.schedule_flush(busy)
    await asyncio.sleep(0)
    assert (busy.flushes, quiet.flushes) == (2, 1)


class Broken(Recorder):
    """A subscriber whose flush raises, as a write on a socket torn down under it can."""

    def flush(self) -> None:
        super().flush()
        raise RuntimeError("unable to perform operation on a closed transport")


async def test_a_failing_flush_does_not_hold_up_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    broken, fine = Broken(Encoding.JSON), Recorder(Encoding.JSON)
    hub.schedule_flush(broken)
    hub.schedule_flush(fine)
    await asyncio.sleep(0)
    assert (broken.flushes, fine.flushes) == (1, 1)
    assert "flushing a connection failed" in caplog.text


def _ids(subscriber: Recorder) -> list[int]:
    return [orjson.loads(payload_of(frame))["payload"]["n"] for frame in subscriber.frames]


def test_a_late_broker_delivery_of_a_replayed_message_is_not_sent_twice() -> None:
    # The broker may hand over a message after the replay (read elsewhere) already
    # included it; the just-activated subscriber must not get it again, others must.
    hub = Hub()
    steady, fresh = Recorder(Encoding.JSON), Recorder(Encoding.JSON)
    live(hub, NEWS, steady)
    hub.begin(NEWS, fresh)
    assert hub.activate(NEWS, fresh, "1000-5") == []  # replayed up to 1000-5
    for seq in (4, 5, 6, 7):
        hub.deliver(message(seq))
    assert _ids(steady) == [4, 5, 6, 7]
    assert _ids(fresh) == [6, 7]
    # Past the floor the fast path is back, with no floor left to check.
    hub.deliver(message(3))
    assert _ids(fresh) == [6, 7, 3]


def device(device_id: str, *tags: str, opt_in: bool = True) -> Device:
    """A device with ``tags`` in its ``device`` group."""
    return Device(
        id=device_id,
        app="app",
        address=device_id,
        platform="toy",
        opt_in=opt_in,
        tags={"device": list(tags)},
    )


def test_audience_selects_devices_and_skips_everyone_else() -> None:
    hub = Hub()
    plain = Recorder(Encoding.JSON)
    toaster = Recorder(Encoding.JSON, device("d1", "toaster"))
    lamp = Recorder(Encoding.MSGPACK, device("d2", "lamp"))
    opted_out = Recorder(Encoding.JSON, device("d3", "toaster", opt_in=False))
    for subscriber in (plain, toaster, lamp, opted_out):
        live(hub, NEWS, subscriber)

    targeted = message(1)
    targeted.audience = {"tag": "toaster", "group": "device"}
    hub.deliver(targeted)
    hub.deliver(message(2))

    assert [len(s.frames) for s in (plain, toaster, lamp, opted_out)] == [1, 2, 1, 0]
    # Devices and plain subscribers of one encoding share the frame of a message.
    assert toaster.frames[1] is plain.frames[0]
    assert orjson.loads(payload_of(toaster.frames[0]))["id"] == "1000-1"
    assert msgpack.unpackb(payload_of(lamp.frames[0]), raw=False)["id"] == "1000-2"

    hub.remove(NEWS, toaster)
    assert hub.subscribers(NEWS) == 3
    assert set(hub.listeners(NEWS)) == {plain, lamp, opted_out}


class Slow(Recorder):
    """A subscriber whose write takes a while (a full socket buffer, a slow kernel)."""

    def __init__(self, encoding: Encoding, log: list[object]) -> None:
        super().__init__(encoding)
        self.log = log

    def flush(self) -> None:
        super().flush()
        self.log.append(self)
        until = time.perf_counter() + 0.0002
        while time.perf_counter() < until:
            pass


async def test_a_long_flush_lets_the_loop_run_between_slices() -> None:
    hub = Hub()
    log: list[object] = []
    subscribers = [Slow(Encoding.JSON, log) for _ in range(300)]  # some 60 ms of writes
    for subscriber in subscribers:
        hub.schedule_flush(subscriber)
    asyncio.get_running_loop().call_soon(log.append, "other work")
    # Scheduled again while waiting for its turn: still written once.
    hub.schedule_flush(subscribers[-1])

    for _ in range(100):
        await asyncio.sleep(0)
        if all(s.flushes for s in subscribers):
            break
    # Other callbacks ran before the last writes, and everyone was written once, in order.
    assert log.index("other work") < len(subscribers)
    assert [entry for entry in log if entry != "other work"] == subscribers
    assert all(s.flushes == 1 for s in subscribers)


async def test_who_is_scheduled_between_slices_is_written_after_the_rest_of_the_pass() -> None:
    hub = Hub()
    log: list[object] = []
    subscribers = [Slow(Encoding.JSON, log) for _ in range(300)]
    for subscriber in subscribers:
        hub.schedule_flush(subscriber)
    newcomer, late = Slow(Encoding.JSON, log), Slow(Encoding.JSON, log)

    def arrive(subscriber: Slow) -> None:
        log.append("scheduled")
        hub.schedule_flush(subscriber)

    loop = asyncio.get_running_loop()
    loop.call_soon(arrive, newcomer)  # runs after the first slice
    for _ in range(100):
        await asyncio.sleep(0)
        if not late.flushes and newcomer.flushes:
            arrive(late)
        if late.flushes:
            break
    scheduled = log.index("scheduled")
    assert 0 < scheduled < len(subscribers)
    assert [entry for entry in log if entry != "scheduled"] == [*subscribers, newcomer, late]
    assert all(s.flushes == 1 for s in [*subscribers, newcomer, late])
