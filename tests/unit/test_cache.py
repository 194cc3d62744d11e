"""The channel cache the publish path reads: fresh records, expiry, one load per miss."""

from __future__ import annotations

import asyncio

from herald.cache import ChannelCache
from herald.models import Channel


class Store:
    """A loader over a dict that counts its loads, each taking one loop iteration."""

    def __init__(self, *names: str) -> None:
        self.channels = {name: Channel(app="app", name=name) for name in names}
        self.loads: list[str] = []

    async def load(self, app: str, name: str) -> Channel | None:
        self.loads.append(name)
        await asyncio.sleep(0)
        return self.channels.get(name)


async def test_fresh_answers_cached_records_and_none_for_the_rest() -> None:
    store = Store("a", "b")
    cache = ChannelCache(store.load)
    await cache.get("app", "a")
    found = cache.fresh("app", ["a", "b", "a", "zzz", ["unhashable"], None, 7])
    # Each distinct string once; what is not a string is left out, never hashed.
    assert found == {"a": store.channels["a"], "b": None, "zzz": None}
    assert store.loads == ["a"]  # fresh() never loads
    assert cache.peek("app", "a") is store.channels["a"]
    assert cache.peek("app", "b") is None
    assert cache.peek("other-app", "a") is None


async def test_expired_records_are_not_fresh() -> None:
    store = Store("a")
    cache = ChannelCache(store.load, ttl=0.0)
    assert await cache.get("app", "a") is store.channels["a"]
    assert cache.fresh("app", ["a"]) == {"a": None}
    assert cache.peek("app", "a") is None


async def test_concurrent_misses_share_one_load() -> None:
    store = Store("a")
    cache = ChannelCache(store.load)
    results = await asyncio.gather(*(cache.get("app", "a") for _ in range(5)))
    assert results == [store.channels["a"]] * 5
    assert store.loads == ["a"]


async def test_forget_drops_one_record() -> None:
    store = Store("a", "b")
    cache = ChannelCache(store.load)
    await asyncio.gather(cache.get("app", "a"), cache.get("app", "b"))
    cache.forget("app", "a")
    assert cache.fresh("app", ["a", "b"]) == {"a": None, "b": store.channels["b"]}
