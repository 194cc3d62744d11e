"""Idempotent publishing when the worker holding a request dies (a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from herald import publishing
from herald.auth import Principal
from herald.cache import ChannelCache
from herald.config import Settings
from herald.engines.redis import RedisEngine
from herald.models import Channel, Message
from herald.publishing import Publisher
from tests.support import RedisProcess, wait_until


@pytest.fixture
async def engine(fresh_redis: RedisProcess) -> AsyncIterator[RedisEngine]:
    """A started Redis engine on the test's own redis-server."""
    built = RedisEngine(fresh_redis.url)
    await built.start(lambda message: None)
    yield built
    await built.close()


async def test_a_request_cut_short_holds_its_key_for_seconds_not_minutes(
    engine: RedisEngine, fresh_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker killed mid-publish never replaces or forgets its in-flight marker: every
    # retry with that key answers 409 until the marker expires.
    publisher = Publisher(Settings(), engine, ChannelCache(engine.get_channel), _no_touch)
    stuck = asyncio.Event()

    async def never_returns(principal: Principal, item: Any) -> Message:
        stuck.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    # The publish never ends, as for a worker killed mid-request: the marker stays.
    monkeypatch.setattr(publisher, "publish_item", never_returns)
    principal = Principal(app="a", kind="key", id="k1")
    request = asyncio.create_task(publisher.publish_once(principal, {"channel": "c"}, "retry-1"))
    await stuck.wait()
    try:
        ttl = int(await fresh_redis.cli("TTL", "herald:kv:idem|a|key|k1|retry-1"))
        assert 0 < ttl <= publishing.PENDING_TTL
    finally:
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)


async def test_a_retry_after_the_marker_expired_publishes(
    engine: RedisEngine, fresh_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One second instead of 15, so the test need not wait for the real expiry.
    monkeypatch.setattr(publishing, "PENDING_TTL", 1)
    await engine.create_channel(Channel(app="a", name="c"))
    publisher = Publisher(Settings(), engine, ChannelCache(engine.get_channel), _no_touch)
    principal = Principal(app="a", kind="key", id="k1", scopes=("publish",))
    # What a killed worker leaves behind: the marker, and no answer.
    await engine.put_if_absent("idem|a|key|k1|retry-2", publishing._PENDING, 1)
    with pytest.raises(Exception, match="in progress"):
        await publisher.publish_once(principal, {"channel": "c", "payload": 1}, "retry-2")

    async def expired() -> bool:
        return (await fresh_redis.cli("EXISTS", "herald:kv:idem|a|key|k1|retry-2")).strip() == "0"

    await wait_until(expired)
    first = await publisher.publish_once(principal, {"channel": "c", "payload": 1}, "retry-2")
    again = await publisher.publish_once(principal, {"channel": "c", "payload": 1}, "retry-2")
    assert again.id == first.id
    assert [m.id for m in await engine.history(Channel(app="a", name="c").topic())] == [first.id]


async def _no_touch(channel: Channel) -> None:
    return None
