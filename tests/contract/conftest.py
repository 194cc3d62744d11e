"""Fixtures for the engine contract: one started engine per test, for every engine."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import pytest

from herald.engines import Engine, MemoryEngine
from herald.engines.redis import RedisEngine
from herald.engines.redis_cluster import RedisClusterEngine
from herald.models import Message
from tests.cluster import RedisClusterProcess
from tests.support import RedisProcess, scaled

__all__ = ["ENGINE_FACTORIES", "EngineFactory", "Inbox"]

EngineFactory = Callable[[pytest.FixtureRequest], Engine]
"""Builds an unstarted engine; gets the request so it can use fixtures (a Redis server)."""


def _redis_engine(request: pytest.FixtureRequest) -> Engine:
    redis: RedisProcess = request.getfixturevalue("redis_server")
    return RedisEngine(redis.url)


def _cluster_engine(request: pytest.FixtureRequest) -> Engine:
    cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
    return RedisClusterEngine(cluster.url)


ENGINE_FACTORIES: dict[str, EngineFactory] = {
    "memory": lambda request: MemoryEngine(),
    "redis": _redis_engine,
    "cluster": _cluster_engine,
}


class Inbox:
    """What the engine handed to ``on_message``, in arrival order, and ways to await it.

    Delivery may be asynchronous (through a broker), so tests await arrivals
    instead of reading the list straight after a publish.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._arrived = asyncio.Event()

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[Message]:
        """Wait until at least ``count`` messages arrived; return them all."""
        async with asyncio.timeout(scaled(5)):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.messages

    async def wait_for_message(self, message: Message) -> None:
        """Wait until ``message`` (same topic and id) arrived."""
        async with asyncio.timeout(scaled(5)):
            while not any(m.topic == message.topic and m.id == message.id for m in self.messages):
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
def inbox() -> Inbox:
    """Collects what the engine under test delivers."""
    return Inbox()


@pytest.fixture
def app() -> str:
    """An app name of the test's own, so engines with shared storage do not mix tests.

    Random rather than counted: a store that outlives the run must not hand a
    later run the records of an earlier one.
    """
    return f"contract-{secrets.token_hex(6)}"


@pytest.fixture(params=list(ENGINE_FACTORIES), ids=list(ENGINE_FACTORIES))
async def engine(request: pytest.FixtureRequest, inbox: Inbox) -> AsyncIterator[Engine]:
    """A started engine delivering into ``inbox``; closed after the test."""
    factory = ENGINE_FACTORIES[request.param]
    built = factory(request)
    await built.start(inbox)
    try:
        yield built
    finally:
        # A close that hangs must fail the test, not stall the whole run.
        async with asyncio.timeout(scaled(10)):
            await built.close()
