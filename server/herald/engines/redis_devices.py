"""Devices in Redis: records, the (platform, address) index and who holds each device.

Layout (every key tagged by app, so one app's device keys share a Redis Cluster
slot and a script may touch any of them): ``herald:{app}:dev:<id>`` device record
(JSON), ``herald:{app}:devaddr`` hash ``<platform>\\x1f<address>`` → device id,
``herald:{app}:online`` hash device id → client id (``"<worker>/<n>"``).

A device's id, app, platform and address never change once stored, so the
index entry a record implies is fixed for the record's lifetime.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from herald.engines.redis_records import PRESENCE
from herald.models import Device

__all__ = ["RedisDevices"]

T = TypeVar("T")

# KEYS: address index, new record. ARGV: index field, new id, new record, record key prefix.
# The held record's key is built here (its id is only known here); it carries the same
# {app} tag as KEYS, so it lives in their slot.
_ADD = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local record = redis.call('GET', ARGV[4] .. held)
  if record then return record end
  -- The index names a device whose record is gone (a write cut short): the address is free.
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
return false
"""

# KEYS: record, address index, online. ARGV: device id, index field.
# DEL decides who removed the device, so of two racing deletes only one answers it.
_DELETE = """
local removed = redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
redis.call('HDEL', KEYS[3], ARGV[1])
return removed
"""

# KEYS: online. ARGV: device id, client id.
_CLEAR = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def _prefix(app: str) -> str:
    return f"herald:{{{app}}}:"


def _field(platform: str, address: str) -> str:
    return f"{platform}\x1f{address}"


def _identity(device: Device) -> tuple[str, str, str, str]:
    return (device.id, device.app, device.platform, device.address)


class RedisDevices:
    """Device storage; mixed into `RedisEngine`, which provides ``redis`` and ``_guard``.

    ``update_device``'s ``change`` must not alter a device's id, app, platform
    or address (the keys and the index are derived from them): it raises
    `ValueError` and stores nothing if it does.
    """

    redis: Redis
    _guard: Callable[[], contextlib.AbstractAsyncContextManager[None]]

    async def add_device(self, device: Device) -> Device | None:
        """One script: claim the address in the index and store the record, or answer
        the device already holding the address."""
        prefix = _prefix(device.app)
        async with self._guard():
            held: Any = await self.redis.eval(
                _ADD,
                2,
                f"{prefix}devaddr",
                f"{prefix}dev:{device.id}",
                _field(device.platform, device.address),
                device.id,
                orjson.dumps(device.to_record()),
                f"{prefix}dev:",
            )
        return None if held is None else Device.from_record(orjson.loads(held))

    async def get_device(self, app: str, device_id: str) -> Device | None:
        """GET the record."""
        async with self._guard():
            raw = await self.redis.get(f"{_prefix(app)}dev:{device_id}")
        return None if raw is None else Device.from_record(orjson.loads(raw))

    async def find_device(self, app: str, platform: str, address: str) -> Device | None:
        """Follow the address index to the record."""
        async with self._guard():
            device_id: Any = await self.redis.hget(
                f"{_prefix(app)}devaddr", _field(platform, address)
            )
        return None if device_id is None else await self.get_device(app, device_id.decode())

    async def update_device(
        self, app: str, device_id: str, change: Callable[[Device], T]
    ) -> tuple[Device, T] | None:
        """Optimistic: WATCH the record, read it, ``change`` it, write it in MULTI/EXEC;
        when another write came in between, EXEC fails and the whole round starts over."""
        key = f"{_prefix(app)}dev:{device_id}"
        # Entered, not just made: a cluster client finds its nodes on entry.
        async with self._guard():
            pipe = await self.redis.pipeline(transaction=True).__aenter__()
        try:
            while True:
                async with self._guard():
                    await pipe.watch(key)
                    raw: Any = await pipe.get(key)
                if raw is None:
                    return None
                device = Device.from_record(orjson.loads(raw))
                before = _identity(device)
                # Outside the guard: whatever change raises is the caller's, not "unavailable".
                result = change(device)
                if _identity(device) != before:
                    raise ValueError("a device's id, app, platform and address cannot change")
                async with self._guard():
                    pipe.multi()  # type: ignore[no-untyped-call,unused-ignore]
                    pipe.set(key, orjson.dumps(device.to_record()))
                    try:
                        await pipe.execute()
                    except WatchError:
                        continue
                return device, result
        finally:
            # UNWATCHes if we leave while watching (change raised, or no record) and gives
            # the connection back. The answer is settled by now: a failure here changes nothing.
            with contextlib.suppress(RedisError, OSError):
                await pipe.reset()  # type: ignore[no-untyped-call,unused-ignore]

    async def delete_device(self, app: str, device_id: str) -> Device | None:
        """Read the record (for its index entry), then one script drops record, index
        entry and connection."""
        device = await self.get_device(app, device_id)
        if device is None:
            return None
        prefix = _prefix(app)
        async with self._guard():
            removed: Any = await self.redis.eval(
                _DELETE,
                3,
                f"{prefix}dev:{device_id}",
                f"{prefix}devaddr",
                f"{prefix}online",
                device_id,
                _field(device.platform, device.address),
            )
        return device if removed else None

    async def set_connection(self, app: str, device_id: str, client_id: str) -> None:
        """HSET in the online hash."""
        async with self._guard():
            await self.redis.hset(f"{_prefix(app)}online", device_id, client_id)

    async def clear_connection(self, app: str, device_id: str, client_id: str) -> None:
        """Compare and delete in one script: a newer connection's entry is kept."""
        async with self._guard():
            await self.redis.eval(_CLEAR, 1, f"{_prefix(app)}online", device_id, client_id)

    async def connections(self, app: str, device_ids: list[str]) -> dict[str, str]:
        """HMGET the devices' connections, then keep those whose worker's presence
        report (``herald:{presence}`` score: its expiry) is still fresh."""
        if not device_ids:
            return {}
        async with self._guard():
            held: Any = await self.redis.hmget(f"{_prefix(app)}online", device_ids)
            found = {
                device_id: client.decode()
                for device_id, client in zip(device_ids, held, strict=True)
                if client is not None
            }
            if not found:
                return {}
            workers = sorted({client.rpartition("/")[0] for client in found.values()})
            expiries: Any = await self.redis.zmscore(PRESENCE, workers)
        now = time.time()
        live = {
            worker
            for worker, expiry in zip(workers, expiries, strict=True)
            if expiry is not None and float(expiry) > now
        }
        return {
            device_id: client
            for device_id, client in found.items()
            if client.rpartition("/")[0] in live
        }
