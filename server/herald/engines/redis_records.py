"""Records in Redis (channels, keys, apps): the half of the Redis engine that is plain storage.

Layout: ``herald:{app}:ch:<name>`` channel record (JSON), ``herald:{app}:chs``
zset of names, ``herald:{app}:chn`` hash of message counts;
``herald:key:<sha256>`` key record (JSON), ``herald:keyids`` hash id → hash,
``herald:{app}:keys`` set of the app's key ids; ``herald:apps`` hash name → app.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from herald.errors import Unavailable
from herald.models import App, Channel, KeyRecord

__all__ = ["PRESENCE", "RedisRecords"]

_IDLE = "herald:idle"
# One hash tag for the seen-workers zset and each worker's counts, so that a
# transaction may write both on Redis Cluster too.
PRESENCE = "herald:{presence}"
_CLAIM_IDLE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""


class RedisRecords:
    """Record storage; mixed into `RedisEngine`, which provides ``redis``."""

    redis: Redis

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, RedisClusterException, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {type(exc).__name__}") from None

    async def create_channel(self, channel: Channel) -> bool:
        """SET NX the record, then index the name."""
        app = channel.app
        async with self._guard():
            created = await self.redis.set(
                f"herald:{{{app}}}:ch:{channel.name}", orjson.dumps(channel.to_record()), nx=True
            )
            if not created:
                return False
            await self.redis.zadd(f"herald:{{{app}}}:chs", {channel.name: 0})
        return True

    async def get_channel(self, app: str, name: str) -> Channel | None:
        """The record and its message count in one round trip."""
        async with self._guard(), self.redis.pipeline(transaction=False) as pipe:
            pipe.get(f"herald:{{{app}}}:ch:{name}")
            pipe.hget(f"herald:{{{app}}}:chn", name)
            raw, count = await pipe.execute()
        if raw is None:
            return None
        channel = Channel.from_record(orjson.loads(raw))
        channel.messages = int(count or 0)
        return channel

    async def save_channel(self, channel: Channel) -> None:
        """Overwrite the record (the count lives apart, so it is kept)."""
        async with self._guard():
            await self.redis.set(
                f"herald:{{{channel.app}}}:ch:{channel.name}", orjson.dumps(channel.to_record())
            )

    async def list_channels(self, app: str, *, after: str | None, limit: int) -> list[Channel]:
        """ZRANGEBYLEX over the name index, then the records."""
        low = f"({after}" if after is not None else "-"
        async with self._guard():
            names: list[Any] = await self.redis.zrangebylex(
                f"herald:{{{app}}}:chs", low, "+", 0, limit
            )
        channels = []
        for name in names:
            channel = await self.get_channel(app, name.decode())
            if channel is not None:
                channels.append(channel)
        return channels

    async def add_key(self, key: KeyRecord) -> None:
        """Store by hash; a record with the same id is replaced."""
        record = {
            "id": key.id,
            "app": key.app,
            "scopes": list(key.scopes),
            "key_hash": key.key_hash,
            "name": key.name,
            "created_at": key.created_at,
        }
        async with self._guard():
            old: Any = await self.redis.hget("herald:keyids", key.id)
            if old is not None and old.decode() != key.key_hash:
                await self.redis.delete(f"herald:key:{old.decode()}")
            await self.redis.set(f"herald:key:{key.key_hash}", orjson.dumps(record))
            await self.redis.hset("herald:keyids", key.id, key.key_hash)
            await self.redis.sadd(f"herald:{{{key.app}}}:keys", key.id)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        """GET by hash."""
        async with self._guard():
            raw = await self.redis.get(f"herald:key:{key_hash}")
        if raw is None:
            return None
        record = orjson.loads(raw)
        record["scopes"] = tuple(record["scopes"])
        return KeyRecord(**record)

    async def find_key_by_id(self, key_id: str) -> KeyRecord | None:
        """Follow the id index to the record."""
        async with self._guard():
            key_hash: Any = await self.redis.hget("herald:keyids", key_id)
        return None if key_hash is None else await self.find_key(key_hash.decode())

    async def list_keys(self, app: str) -> list[KeyRecord]:
        """The app's key ids, then their records; oldest first."""
        async with self._guard():
            ids: Any = await self.redis.smembers(f"herald:{{{app}}}:keys")
        keys = [await self.find_key_by_id(key_id.decode()) for key_id in ids]
        found = [key for key in keys if key is not None and key.app == app]
        return sorted(found, key=lambda key: (key.created_at, key.id))

    async def delete_key(self, app: str, key_id: str) -> KeyRecord | None:
        """Remove the record and both index entries."""
        key = await self.find_key_by_id(key_id)
        if key is None or key.app != app:
            return None
        async with self._guard():
            await self.redis.delete(f"herald:key:{key.key_hash}")
            await self.redis.hdel("herald:keyids", key_id)
            await self.redis.srem(f"herald:{{{app}}}:keys", key_id)
        return key

    async def create_app(self, app: App) -> bool:
        """HSETNX in the apps hash."""
        record = {"name": app.name, "token_secret": app.token_secret, "created_at": app.created_at}
        async with self._guard():
            return bool(await self.redis.hsetnx("herald:apps", app.name, orjson.dumps(record)))

    async def get_app(self, name: str) -> App | None:
        """HGET from the apps hash."""
        async with self._guard():
            raw: Any = await self.redis.hget("herald:apps", name)
        return None if raw is None else App(**orjson.loads(raw))

    async def list_apps(self) -> list[App]:
        """Every app, sorted by name."""
        async with self._guard():
            raw: Any = await self.redis.hvals("herald:apps")
        return sorted((App(**orjson.loads(r)) for r in raw), key=lambda app: app.name)

    async def put_if_absent(self, key: str, value: bytes, ttl: int) -> bytes | None:
        """SET NX GET (Redis >= 7): the old value, or None when this call stored it."""
        async with self._guard():
            held: Any = await self.redis.set(f"herald:kv:{key}", value, ex=ttl, nx=True, get=True)
        return None if held is None else bytes(held)

    async def put(self, key: str, value: bytes, ttl: int) -> None:
        """SET EX."""
        async with self._guard():
            await self.redis.set(f"herald:kv:{key}", value, ex=ttl)

    async def forget(self, key: str) -> None:
        """DEL."""
        async with self._guard():
            await self.redis.delete(f"herald:kv:{key}")

    async def touch_idle(self, app: str, name: str, deadline: float | None) -> None:
        """ZADD (or ZREM) in the deadlines zset."""
        async with self._guard():
            if deadline is None:
                await self.redis.zrem(_IDLE, f"{app}|{name}")
            else:
                await self.redis.zadd(_IDLE, {f"{app}|{name}": deadline})

    async def claim_idle(self, now: float) -> list[tuple[str, str]]:
        """One script takes the passed deadlines out: no two workers get the same one."""
        async with self._guard():
            claimed: Any = await self.redis.eval(_CLAIM_IDLE, 1, _IDLE, now)
        pairs = (member.decode().partition("|") for member in claimed)
        return [(app, name) for app, _, name in pairs]

    async def report_presence(self, worker: str, counts: dict[str, int], ttl: float) -> None:
        """Replace this worker's hash, and mark the worker seen."""
        key = f"{PRESENCE}:{worker}"
        async with self._guard(), self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if counts:
                pipe.hset(key, mapping=counts)  # type: ignore[arg-type,unused-ignore]
                pipe.pexpire(key, int(ttl * 1000))
            pipe.zadd(PRESENCE, {worker: time.time() + ttl})
            await pipe.execute()

    async def refresh_presence(self, worker: str, ttl: float) -> bool:
        """PEXPIRE this worker's hash and mark the worker seen: two small commands where a
        full report rewrites a field per channel."""
        async with self._guard(), self.redis.pipeline(transaction=True) as pipe:
            pipe.pexpire(f"{PRESENCE}:{worker}", int(ttl * 1000))
            pipe.zadd(PRESENCE, {worker: time.time() + ttl})
            kept, _ = await pipe.execute()
        return bool(kept)

    async def presence(self, app: str, name: str, exclude: str) -> int:
        """Sum the channel's count over the other workers whose report is still fresh."""
        async with self._guard():
            workers: Any = await self.redis.zrangebyscore(PRESENCE, time.time(), "+inf")
            others = [w.decode() for w in workers if w.decode() != exclude]
            if not others:
                return 0
            async with self.redis.pipeline(transaction=False) as pipe:
                for worker in others:
                    pipe.hget(f"{PRESENCE}:{worker}", f"{app}|{name}")
                counts = await pipe.execute()
        return sum(int(count) for count in counts if count is not None)

    async def add_subscription(self, app: str, target: str, subscriber: str) -> bool:
        """Two sets: the channel's (target + subscriber) and the subscriber's targets."""
        channel = target.partition("|")[0]
        async with self._guard(), self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(f"herald:{{{app}}}:subs:ch:{channel}", f"{target}\x1f{subscriber}")
            pipe.sadd(f"herald:{{{app}}}:subs:of:{subscriber}", target)
            added, _ = await pipe.execute()
        return bool(added)

    async def remove_subscription(self, app: str, target: str, subscriber: str) -> bool:
        """SREM from both sets."""
        channel = target.partition("|")[0]
        async with self._guard(), self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(f"herald:{{{app}}}:subs:ch:{channel}", f"{target}\x1f{subscriber}")
            pipe.srem(f"herald:{{{app}}}:subs:of:{subscriber}", target)
            removed, _ = await pipe.execute()
        return bool(removed)

    async def subscriptions(self, app: str, subscriber: str) -> list[str]:
        """SMEMBERS of the subscriber's set."""
        async with self._guard():
            targets: Any = await self.redis.smembers(f"herald:{{{app}}}:subs:of:{subscriber}")
        return sorted(target.decode() for target in targets)

    async def subscribers(self, app: str, channel: str) -> list[str]:
        """SMEMBERS of the channel's set, each subscriber once."""
        async with self._guard():
            entries: Any = await self.redis.smembers(f"herald:{{{app}}}:subs:ch:{channel}")
        return sorted({entry.decode().partition("\x1f")[2] for entry in entries})

    async def drop_subscribers(self, app: str, channel: str) -> None:
        """Empty the channel's set and take its targets out of each subscriber's set."""
        key = f"herald:{{{app}}}:subs:ch:{channel}"
        async with self._guard():
            entries: Any = await self.redis.smembers(key)
            async with self.redis.pipeline(transaction=True) as pipe:
                for entry in entries:
                    target, _, subscriber = entry.decode().partition("\x1f")
                    pipe.srem(f"herald:{{{app}}}:subs:of:{subscriber}", target)
                pipe.delete(key)
                await pipe.execute()
