"""Engines: where messages, history and records live. See `herald.engines.base`."""

from __future__ import annotations

from herald.config import Settings
from herald.engines.base import Engine, MessageHandler
from herald.engines.memory import MemoryEngine

__all__ = ["Engine", "MemoryEngine", "MessageHandler", "make_engine"]


def make_engine(settings: Settings) -> Engine:
    """The engine the settings ask for: Redis Cluster, Redis, else memory.

    The Redis engines are imported here, not at the top: a memory-engine
    server never loads the Redis client.
    """
    if settings.redis_cluster:
        from herald.engines.redis_cluster import RedisClusterEngine

        return RedisClusterEngine(settings.redis_cluster)
    if settings.redis_url:
        from herald.engines.redis import RedisEngine

        return RedisEngine(settings.redis_url)
    return MemoryEngine()
