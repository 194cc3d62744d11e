"""The engine contract of `herald.engines.base`, checked against every engine.

Each test gets a freshly started engine (see ``conftest.py``) and an app of
its own, so an engine with shared storage runs the same suite unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import datetime
from typing import Any

from herald.engines import Engine, MemoryEngine
from herald.models import ACL, Channel, KeyRecord, Message, Topic, offset_key
from tests.contract.conftest import Inbox
from tests.support import scaled

AUTHOR = {"type": "key", "id": "k1"}


def make_channel(app: str, name: str = "news", **fields: Any) -> Channel:
    """A channel record for ``app``."""
    return Channel(app=app, name=name, **fields)


def draft(topic: Topic, payload: Any = None, **fields: Any) -> Message:
    """A message before publish: id and created_at are the engine's to assign."""
    return Message(
        id="",
        app=topic.app,
        channel=topic.channel,
        room=topic.room,
        payload=payload,
        author=AUTHOR,
        created_at="",
        **fields,
    )


async def publish_many(engine: Engine, channel: Channel, count: int) -> list[Message]:
    """Publish ``count`` messages with payloads 0..count-1 to the channel's topic, in order."""
    topic = channel.topic()
    return [await engine.publish(channel, draft(topic, {"n": n})) for n in range(count)]


def ids(messages: list[Message]) -> list[str]:
    """The ids, in the same order."""
    return [m.id for m in messages]


def digest(app: str, n: int) -> str:
    """A key hash unique to the test: key records are not scoped by app in every store."""
    return hashlib.sha256(f"{app}/{n}".encode()).hexdigest()


def beyond(message_id: str, *, next_ms: bool = False) -> str:
    """An id just after ``message_id``: its next sequence number, or the next millisecond."""
    ms, seq = offset_key(message_id)
    return f"{ms + 1}-0" if next_ms else f"{ms}-{seq + 1}"


async def settled(engine: Engine, inbox: Inbox, app: str) -> list[Message]:
    """What was delivered, once everything published before this call had its chance.

    A marker published afterwards to a topic of its own bounds the wait, so
    "not delivered" is checked without sleeping on a guess; the marker is left
    out of the answer.
    """
    marker_topic = Topic(app, "marker")
    await engine.subscribe(marker_topic)
    marker = await engine.publish(make_channel(app, "marker"), draft(marker_topic, "marker"))
    await inbox.wait_for_message(marker)
    await engine.unsubscribe(marker_topic)
    return [m for m in inbox.messages if m.topic != marker_topic]


# publish


async def test_ping_answers_when_started(engine: Engine) -> None:
    await engine.ping()


async def test_publish_assigns_ordered_ids_and_created_at(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    before = datetime.now().astimezone()
    published = await publish_many(engine, channel, 30)
    later = datetime.now().astimezone()

    keys = [offset_key(m.id) for m in published]
    # Strictly increasing: also rules out two messages sharing an id.
    assert keys == sorted(keys)
    assert len(set(keys)) == 30
    for message in published:
        assert re.fullmatch(r"[0-9]+-[0-9]+", message.id)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", message.created_at)
        assert before <= datetime.fromisoformat(message.created_at) <= later
    assert [m.payload for m in published] == [{"n": n} for n in range(30)]


async def test_publish_keeps_the_message_fields(engine: Engine, app: str) -> None:
    channel = make_channel(app, "rooms", type="separate_rooms")
    topic = channel.topic("r1")
    sent = draft(
        topic,
        {"text": "hi", "list": [1, 2.5, None]},
        metadata={"trace": "t1"},
        audience={"tag": "toaster", "group": "device"},
    )

    message = await engine.publish(channel, sent)

    assert message.topic == topic
    assert message.payload == {"text": "hi", "list": [1, 2.5, None]}
    assert message.author == AUTHOR
    assert message.metadata == {"trace": "t1"}
    assert message.audience == {"tag": "toaster", "group": "device"}
    assert await engine.history(topic) == [message]


# delivery


async def test_delivery_only_while_subscribed_in_order(
    engine: Engine, inbox: Inbox, app: str
) -> None:
    channel = make_channel(app)
    topic = channel.topic()
    await engine.publish(channel, draft(topic, "before subscribe"))
    await engine.subscribe(topic)
    await engine.subscribe(topic)  # idempotent: must not double deliveries

    published = await publish_many(engine, channel, 5)
    delivered = await inbox.wait_for(5)
    assert ids(delivered) == ids(published)
    assert [m.payload for m in delivered] == [{"n": n} for n in range(5)]

    await engine.unsubscribe(topic)
    await engine.unsubscribe(topic)
    await engine.publish(channel, draft(topic, "after unsubscribe"))

    assert ids(await settled(engine, inbox, app)) == ids(published)


async def test_concurrent_publishes_keep_the_order_they_were_started_in(
    engine: Engine, inbox: Inbox, app: str
) -> None:
    # Publishes started together (as a batch publish or a pipelining client does)
    # must get ids, history and delivery in the order they were started.
    channel = make_channel(app, history_size=1000)
    topic = channel.topic()
    await engine.subscribe(topic)
    published = await asyncio.gather(
        *(engine.publish(channel, draft(topic, {"n": n})) for n in range(300))
    )
    assert [m.payload for m in published] == [{"n": n} for n in range(300)]
    assert sorted(ids(published), key=offset_key) == ids(published)
    assert ids(await engine.history(topic, limit=1000)) == ids(published)
    assert ids(await inbox.wait_for(300)) == ids(published)


async def test_delivered_message_equals_published(engine: Engine, inbox: Inbox, app: str) -> None:
    channel = make_channel(app)
    await engine.subscribe(channel.topic())

    published = await engine.publish(channel, draft(channel.topic(), {"a": 1}, metadata={"m": 2}))

    assert await inbox.wait_for(1) == [published]


async def test_topics_are_isolated_by_app_channel_and_room(
    engine: Engine, inbox: Inbox, app: str
) -> None:
    home = make_channel(app, "rooms", type="separate_rooms")
    other_channel = make_channel(app, "rooms2", type="separate_rooms")
    other_app = make_channel(f"{app}-other", "rooms", type="separate_rooms")
    await engine.subscribe(home.topic("r1"))

    mine = await engine.publish(home, draft(home.topic("r1"), "mine"))
    other_room = await engine.publish(home, draft(home.topic("r2"), "other room"))
    in_channel = await engine.publish(other_channel, draft(other_channel.topic("r1"), "channel"))
    in_app = await engine.publish(other_app, draft(other_app.topic("r1"), "app"))

    assert ids(await settled(engine, inbox, app)) == [mine.id]
    assert await engine.history(home.topic("r1")) == [mine]
    assert await engine.history(home.topic("r2")) == [other_room]
    assert await engine.history(other_channel.topic("r1")) == [in_channel]
    assert await engine.history(other_app.topic("r1")) == [in_app]
    assert (await engine.position(home.topic("r1"))).offset == mine.id
    assert (await engine.position(other_app.topic("r1"))).offset == in_app.id


# history


async def test_history_since_until_limit_reverse(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    topic = channel.topic()
    m = ids(await publish_many(engine, channel, 10))

    async def read(**query: Any) -> list[str]:
        return ids(await engine.history(topic, **query))

    assert await read() == m
    assert await read(since="0-0") == m
    assert await read(until=beyond(m[-1], next_ms=True)) == m
    # since and until are both exclusive.
    assert await read(since=m[2]) == m[3:]
    assert await read(until=m[7]) == m[:7]
    assert await read(since=m[2], until=m[7]) == m[3:7]
    # limit takes from the oldest end, or from the newest with reverse.
    assert await read(limit=3) == m[:3]
    assert await read(reverse=True) == m[::-1]
    assert await read(limit=3, reverse=True) == [m[9], m[8], m[7]]
    assert await read(since=m[2], until=m[7], limit=2) == [m[3], m[4]]
    assert await read(since=m[2], until=m[7], limit=2, reverse=True) == [m[6], m[5]]
    assert await read(since=m[2], until=m[7], limit=100, reverse=True) == m[6:2:-1]
    assert await read(limit=1) == [m[0]]
    # Empty ranges.
    assert await read(limit=0) == []
    assert await read(since=m[9]) == []
    assert await read(until=m[0]) == []
    assert await read(since=m[5], until=m[5]) == []
    assert await read(since=m[5], until=m[6]) == []
    assert await read(since=m[7], until=m[2]) == []
    assert await read(since=beyond(m[-1])) == []


async def test_history_of_unknown_topic_is_empty(engine: Engine, app: str) -> None:
    assert await engine.history(Topic(app, "never-published")) == []
    assert await engine.history(Topic(app, "never-published"), since="0-0", reverse=True) == []


async def test_history_returns_what_publish_returned(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    published = await publish_many(engine, channel, 3)
    assert await engine.history(channel.topic()) == published


async def test_history_trimmed_to_history_size(engine: Engine, app: str) -> None:
    channel = make_channel(app, history_size=3)
    m = ids(await publish_many(engine, channel, 8))

    held = ids(await engine.history(channel.topic()))

    # At least the newest history_size, and always a suffix: never a hole.
    assert len(held) >= 3
    assert held == m[len(m) - len(held) :]
    if isinstance(engine, MemoryEngine):
        # Approximate trimming is allowed in general; the memory engine trims exactly.
        assert held == m[-3:]
    # Read with the history size, exactly the newest history_size.
    assert ids(await engine.history(channel.topic(), size=3)) == m[-3:]
    assert ids(await engine.history(channel.topic(), size=3, limit=2)) == m[-3:-1]
    assert ids(await engine.history(channel.topic(), size=3, reverse=True)) == m[:-4:-1]


async def test_history_read_with_a_smaller_size_leaves_out_the_oldest(
    engine: Engine, app: str
) -> None:
    # history_size lowered after publishing: the next publish trims, reads do not wait.
    channel = make_channel(app, history_size=10)
    m = ids(await publish_many(engine, channel, 6))
    topic = channel.topic()

    assert ids(await engine.history(topic, size=4)) == m[-4:]
    assert ids(await engine.history(topic, size=4, reverse=True, limit=3)) == m[:-4:-1]
    assert ids(await engine.history(topic, size=4, since=m[3])) == m[4:]
    assert ids(await engine.history(topic, size=4, until=m[4])) == m[2:4]
    assert ids(await engine.history(topic, size=10)) == m


# recover


async def test_recover_fresh_topic_from_zero(engine: Engine, app: str) -> None:
    topic = Topic(app, "fresh")
    recovery = await engine.recover(topic, "0-0")
    assert recovery.recovered is True
    assert recovery.messages == []
    assert recovery.position.offset == "0-0"


async def test_recover_from_retained_id(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    published = await publish_many(engine, channel, 5)
    topic = channel.topic()

    recovery = await engine.recover(topic, published[1].id)
    assert recovery.recovered is True
    assert recovery.messages == published[2:]
    assert recovery.position == await engine.position(topic)
    assert recovery.position.offset == published[-1].id

    newest = await engine.recover(topic, published[-1].id)
    assert (newest.recovered, newest.messages) == (True, [])

    everything = await engine.recover(topic, "0-0")
    assert (everything.recovered, everything.messages) == (True, published)


async def test_recover_across_the_trim_point(engine: Engine, app: str) -> None:
    channel = make_channel(app, history_size=3)
    published = await publish_many(engine, channel, 7)
    topic = channel.topic()
    retained = await engine.history(topic, size=3)
    trimmed = published[: len(published) - len(retained)]
    assert len(trimmed) >= 2

    # Nothing after the newest trimmed message is missing.
    recovery = await engine.recover(topic, trimmed[-1].id)
    assert recovery.recovered is True
    assert recovery.messages == retained

    # The message after this one is gone: the client must be told.
    for since in (trimmed[-2].id, trimmed[0].id, "0-0"):
        lossy = await engine.recover(topic, since)
        assert lossy.recovered is False, since
        assert lossy.messages == retained, since
        assert lossy.position.offset == published[-1].id


async def test_recover_from_id_ahead_of_newest(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    published = await publish_many(engine, channel, 2)
    topic = channel.topic()

    for since in (beyond(published[-1].id), beyond(published[-1].id, next_ms=True)):
        recovery = await engine.recover(topic, since)
        assert recovery.recovered is False, since
        assert recovery.messages == [], since


async def test_recover_checks_the_epoch(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    published = await publish_many(engine, channel, 3)
    topic = channel.topic()
    epoch = (await engine.position(topic)).epoch

    current = await engine.recover(topic, published[0].id, epoch)
    assert (current.recovered, current.messages) == (True, published[1:])

    # Ids from another epoch may name different messages: nothing can be trusted.
    stale = await engine.recover(topic, published[0].id, f"{epoch}-old")
    assert (stale.recovered, stale.messages) == (False, published[1:])


async def test_recover_from_unknown_id_inside_the_range(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    topic = channel.topic()
    first = await engine.publish(channel, draft(topic, 1))
    # Ids are milliseconds: waiting one out opens a gap no message can fill.
    await asyncio.sleep(0.002)
    second = await engine.publish(channel, draft(topic, 2))
    gap = beyond(first.id)
    assert offset_key(first.id) < offset_key(gap) < offset_key(second.id)

    # Never published here, so the client's history is not this one.
    recovery = await engine.recover(topic, gap)
    assert recovery.recovered is False
    assert recovery.messages == [second]


async def test_recover_from_id_ahead_on_fresh_topic(engine: Engine, app: str) -> None:
    recovery = await engine.recover(Topic(app, "fresh"), "1700000000000-0")
    assert recovery.recovered is False
    assert recovery.messages == []


# position


async def test_position_tracks_newest_id_with_stable_epoch(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    topic = channel.topic()

    empty = await engine.position(topic)
    assert empty.offset == "0-0"
    assert isinstance(empty.epoch, str)
    assert empty.epoch != ""

    first = await engine.publish(channel, draft(topic, 1))
    assert await engine.position(topic) == (first.id, empty.epoch)
    second = await engine.publish(channel, draft(topic, 2))
    assert await engine.position(topic) == (second.id, empty.epoch)
    assert (await engine.recover(topic, first.id)).position == (second.id, empty.epoch)


# history_ttl


async def test_history_expires_after_history_ttl(engine: Engine, app: str) -> None:
    channel = make_channel(app, history_ttl=1)
    topic = channel.topic()
    published = await publish_many(engine, channel, 2)
    assert await engine.history(topic) == published

    # Expiry is the passage of time itself: there is nothing to await instead.
    await asyncio.sleep(scaled(1.2))

    assert await engine.history(topic) == []
    for since in ("0-0", published[0].id):
        recovery = await engine.recover(topic, since)
        assert recovery.recovered is False, since
        assert recovery.messages == [], since

    # Ids keep growing after expiry, so clients holding old ids stay ordered.
    fresh = await engine.publish(channel, draft(topic, "fresh"))
    assert offset_key(fresh.id) > offset_key(published[-1].id)
    assert await engine.history(topic) == [fresh]


# channel records


async def test_create_channel_refuses_duplicate_name(engine: Engine, app: str) -> None:
    first = make_channel(app, description="first")
    assert await engine.create_channel(first) is True
    assert await engine.create_channel(make_channel(app, description="second")) is False

    stored = await engine.get_channel(app, "news")
    assert stored is not None
    assert stored.to_record() == first.to_record()
    # Same name, another app: a different channel.
    assert await engine.create_channel(make_channel(f"{app}-other")) is True


async def test_get_unknown_channel_is_none(engine: Engine, app: str) -> None:
    await engine.create_channel(make_channel(app))
    assert await engine.get_channel(app, "missing") is None
    assert await engine.get_channel(f"{app}-other", "news") is None


async def test_get_channel_round_trips_every_field(engine: Engine, app: str) -> None:
    channel = make_channel(
        app,
        "rooms",
        type="separate_rooms",
        description="d",
        custom_publish=True,
        readers=ACL(any_user=True),
        writers=ACL(user_ids=["u1", "u2"]),
        editors=ACL(immutable=True),
        annotations=[{"type": "t", "value": {"x": 1}}],
        history_size=7,
        history_ttl=60,
        idle_timeout=30,
        owner={"type": "user", "id": "u1"},
    )
    await engine.create_channel(channel)

    stored = await engine.get_channel(app, "rooms")
    assert stored is not None
    assert stored.to_record() == channel.to_record()


async def test_records_are_copies(engine: Engine, app: str) -> None:
    # Only save_channel may change a stored record, whatever callers do to their objects.
    created = make_channel(app, description="kept")
    await engine.create_channel(created)
    created.description = "changed after create"

    fetched = await engine.get_channel(app, "news")
    assert fetched is not None
    fetched.description = "changed without save"

    again = await engine.get_channel(app, "news")
    assert again is not None
    assert again.description == "kept"


async def test_list_channels_sorted_with_after_and_limit(engine: Engine, app: str) -> None:
    for name in ("c", "a", "d", "b"):
        await engine.create_channel(make_channel(app, name))
    await engine.create_channel(make_channel(f"{app}-other", "a0"))

    async def names(after: str | None, limit: int) -> list[str]:
        return [c.name for c in await engine.list_channels(app, after=after, limit=limit)]

    assert await names(None, 10) == ["a", "b", "c", "d"]
    assert await names(None, 2) == ["a", "b"]
    assert await names("a", 2) == ["b", "c"]
    assert await names("b", 10) == ["c", "d"]
    assert await names("a0", 10) == ["b", "c", "d"]
    assert await names("d", 10) == []
    assert await engine.list_channels(f"{app}-none", after=None, limit=10) == []


async def test_publish_counts_messages_and_save_keeps_the_count(engine: Engine, app: str) -> None:
    channel = make_channel(app)
    await engine.create_channel(channel)
    await publish_many(engine, channel, 2)

    stored = await engine.get_channel(app, "news")
    assert stored is not None
    assert stored.messages == 2

    stored.description = "updated"
    stored.messages = 0
    await engine.save_channel(stored)
    saved = await engine.get_channel(app, "news")
    assert saved is not None
    assert (saved.description, saved.messages) == ("updated", 2)

    await engine.publish(channel, draft(channel.topic(), "third"))
    counted = await engine.get_channel(app, "news")
    assert counted is not None
    assert counted.messages == 3


# keys


async def test_keys_add_and_find(engine: Engine, app: str) -> None:
    admin = KeyRecord(
        id=f"{app}-1", app=app, scopes=("admin",), key_hash=digest(app, 1), name="ops"
    )
    publisher = KeyRecord(
        id=f"{app}-2", app=app, scopes=("publish", "subscribe"), key_hash=digest(app, 2)
    )
    await engine.add_key(admin)
    await engine.add_key(publisher)

    assert await engine.find_key(digest(app, 1)) == admin
    assert await engine.find_key(digest(app, 2)) == publisher
    assert await engine.find_key(digest(app, 3)) is None
    assert await engine.find_key_by_id(f"{app}-1") == admin
    assert await engine.find_key_by_id(f"{app}-3") is None


async def test_add_key_with_same_id_replaces_it(engine: Engine, app: str) -> None:
    old = KeyRecord(id=f"{app}-1", app=app, scopes=("admin",), key_hash=digest(app, 1))
    new = KeyRecord(id=f"{app}-1", app=app, scopes=("publish",), key_hash=digest(app, 2))
    await engine.add_key(old)
    await engine.add_key(new)

    # The old secret must stop working, or rotating a key would not revoke it.
    assert await engine.find_key(digest(app, 1)) is None
    assert await engine.find_key(digest(app, 2)) == new
    assert await engine.find_key_by_id(f"{app}-1") == new


async def test_put_if_absent_holds_one_value_per_key(engine: Engine, app: str) -> None:
    key = f"{app}/idem"
    assert await engine.put_if_absent(key, b"first", 60) is None
    assert await engine.put_if_absent(key, b"second", 60) == b"first"
    await engine.put(key, b"final", 60)
    assert await engine.put_if_absent(key, b"third", 60) == b"final"
    await engine.forget(key)
    assert await engine.put_if_absent(key, b"fourth", 60) is None
    short = f"{app}/short"
    assert await engine.put_if_absent(short, b"x", 1) is None
    await asyncio.sleep(scaled(1.2))  # expiry is a matter of the clock
    assert await engine.put_if_absent(short, b"y", 60) is None


async def test_idle_deadlines_are_claimed_once(engine: Engine, app: str) -> None:
    await engine.touch_idle(app, "quiet", 100.0)
    await engine.touch_idle(app, "busy", 300.0)
    await engine.touch_idle(app, "cleared", 100.0)
    await engine.touch_idle(app, "cleared", None)
    mine = [c for c in await engine.claim_idle(200.0) if c[0] == app]
    assert mine == [(app, "quiet")]
    assert [c for c in await engine.claim_idle(200.0) if c[0] == app] == []
    # A publish moves the deadline on: the channel is not due any more.
    await engine.touch_idle(app, "busy", 500.0)
    assert [c for c in await engine.claim_idle(400.0) if c[0] == app] == []
    assert [c for c in await engine.claim_idle(600.0) if c[0] == app] == [(app, "busy")]


async def test_persistent_subscriptions(engine: Engine, app: str) -> None:
    assert await engine.add_subscription(app, "news", "user:ann") is True
    assert await engine.add_subscription(app, "news", "user:ann") is False
    assert await engine.add_subscription(app, "rooms|r1", "user:ann") is True
    assert await engine.add_subscription(app, "news", "user:bob") is True
    assert await engine.subscriptions(app, "user:ann") == ["news", "rooms|r1"]
    assert await engine.subscribers(app, "news") == ["user:ann", "user:bob"]
    assert await engine.subscribers(app, "rooms") == ["user:ann"]
    assert await engine.remove_subscription(app, "news", "user:bob") is True
    assert await engine.remove_subscription(app, "news", "user:bob") is False
    await engine.drop_subscribers(app, "news")
    assert await engine.subscribers(app, "news") == []
    assert await engine.subscriptions(app, "user:ann") == ["rooms|r1"]
    assert await engine.subscriptions("another-app", "user:ann") == []
