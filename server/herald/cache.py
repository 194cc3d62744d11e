"""A short-lived cache of channel records for the publish path.

Publishing and subscribing need the channel's settings (type, ACLs, history
size, closed or not); reading them from Redis each time would double the
round trips. Records are kept for ``ttl`` seconds and dropped on every worker
as soon as a channel changes or closes (a control event); after the engine's
link was down, everything is dropped. Concurrent misses for one channel share
one read (single flight), which also keeps publishes that wait on it in
their original order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from herald.models import Channel

__all__ = ["ChannelCache"]

Loader = Callable[[str, str], Awaitable[Channel | None]]


class ChannelCache:
    """(app, name) → channel record, for at most ``ttl`` seconds. Misses are not cached."""

    def __init__(self, load: Loader, ttl: float = 60.0, max_entries: int = 100_000) -> None:
        self._load = load
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[float, Channel]] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[Channel | None]] = {}

    async def get(self, app: str, name: str) -> Channel | None:
        """The channel record, from the cache when fresh. Treat it as read-only."""
        fresh = self.peek(app, name)
        if fresh is not None:
            return fresh
        key = (app, name)
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Channel | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            channel = await self._load(app, name)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it; no "never retrieved" warning
            raise
        else:
            future.set_result(channel)
        finally:
            del self._loading[key]
        if channel is not None:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = (time.monotonic() + self._ttl, channel)
        return channel

    def peek(self, app: str, name: str) -> Channel | None:
        """The fresh record, if this worker has one; never loads (and never awaits)."""
        entry = self._entries.get((app, name))
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return None

    def fresh(self, app: str, names: Iterable[object]) -> dict[str, Channel | None]:
        """Each distinct string among ``names``: its fresh record here, or None. Never loads."""
        now = time.monotonic()
        entries = self._entries
        found: dict[str, Channel | None] = {}
        for name in names:
            # Only strings: a name from a request may be unhashable (a list, an object).
            if isinstance(name, str) and name not in found:
                entry = entries.get((app, name))
                found[name] = entry[1] if entry is not None and entry[0] > now else None
        return found

    def forget(self, app: str, name: str) -> None:
        """Drop one record (it changed)."""
        self._entries.pop((app, name), None)

    def clear(self) -> None:
        """Drop every record (changes may have been missed)."""
        self._entries.clear()
