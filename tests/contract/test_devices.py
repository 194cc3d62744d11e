"""The device-storage contract of `herald.engines.base`, checked against every engine."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from herald.engines import Engine, MemoryEngine
from herald.engines.redis import RedisEngine
from herald.models import Device
from tests.support import scaled


def make_device(app: str, address: str = "token-1", platform: str = "ios", **fields: Any) -> Device:
    """A device of ``app`` with a fresh id."""
    return Device(
        id=f"dev-{secrets.token_hex(6)}", app=app, address=address, platform=platform, **fields
    )


@contextlib.asynccontextmanager
async def sibling(engine: Engine) -> AsyncIterator[Engine]:
    """Another worker on the same store: a second Redis engine with connections of its
    own, or the memory engine itself (it has only the one)."""
    if not isinstance(engine, RedisEngine):
        yield engine
        return
    other = type(engine)(engine.url)
    try:
        yield other
    finally:
        await other.close()


async def test_add_then_get_and_find_round_trip_every_field(engine: Engine, app: str) -> None:
    device = make_device(
        app,
        "addr-\u00e9\U0001f600",
        "android",
        opt_in=False,
        tags={"sports": ["football", "tennis"], "herald_timezone": ["Europe/Paris"]},
        timezone="Europe/Paris",
        locale_country="FR",
        locale_language="fr",
        identifiers={"user": "u1", "email": "a@example.com"},
        created_at="2024-01-02T03:04:05.678Z",
        updated_at="2024-02-03T04:05:06.789Z",
    )
    assert await engine.add_device(device) is None

    stored = await engine.get_device(app, device.id)
    assert stored == device
    assert await engine.find_device(app, "android", device.address) == device
    assert await engine.get_device(app, "dev-missing") is None
    assert await engine.find_device(app, "android", "addr-missing") is None


async def test_add_with_taken_address_answers_the_holder(engine: Engine, app: str) -> None:
    first = make_device(app, opt_in=True)
    second = make_device(app, opt_in=False)
    assert await engine.add_device(first) is None

    assert await engine.add_device(second) == first
    assert await engine.get_device(app, second.id) is None
    assert await engine.find_device(app, "ios", "token-1") == first


async def test_racing_adds_of_one_address_store_one_device(engine: Engine, app: str) -> None:
    devices = [make_device(app) for _ in range(10)]
    async with sibling(engine) as other:
        answers = await asyncio.gather(
            *((engine if n % 2 else other).add_device(d) for n, d in enumerate(devices))
        )

    winners = [d for d, answer in zip(devices, answers, strict=True) if answer is None]
    assert len(winners) == 1
    assert all(answer == winners[0] for answer in answers if answer is not None)
    stored = [await engine.get_device(app, d.id) for d in devices]
    assert [d for d in stored if d is not None] == winners
    assert await engine.find_device(app, "ios", "token-1") == winners[0]


async def test_address_is_scoped_by_platform_and_app(engine: Engine, app: str) -> None:
    ios = make_device(app, platform="ios")
    android = make_device(app, platform="android")
    elsewhere = make_device(f"{app}-other", platform="ios")
    for device in (ios, android, elsewhere):
        assert await engine.add_device(device) is None

    assert await engine.find_device(app, "ios", "token-1") == ios
    assert await engine.find_device(app, "android", "token-1") == android
    assert await engine.find_device(f"{app}-other", "ios", "token-1") == elsewhere
    # Ids are per app too: another app's device is not found under this one.
    assert await engine.get_device(app, elsewhere.id) is None


async def test_update_applies_the_change_and_persists(engine: Engine, app: str) -> None:
    device = make_device(app, tags={"a": ["1"]})
    await engine.add_device(device)

    def change(d: Device) -> str:
        d.tags["a"].append("2")
        d.timezone = "UTC"
        d.updated_at = "2030-01-01T00:00:00.000Z"
        return "done"

    answer = await engine.update_device(app, device.id, change)
    assert answer is not None
    updated, result = answer
    assert result == "done"
    assert (updated.tags, updated.timezone) == ({"a": ["1", "2"]}, "UTC")
    assert await engine.get_device(app, device.id) == updated
    assert await engine.find_device(app, "ios", "token-1") == updated
    # The engine leaves updated_at to the caller's change.
    assert updated.updated_at == "2030-01-01T00:00:00.000Z"


async def test_update_of_unknown_device_is_none(engine: Engine, app: str) -> None:
    called: list[Device] = []
    assert await engine.update_device(app, "dev-missing", called.append) is None
    assert called == []


async def test_change_that_raises_stores_nothing(engine: Engine, app: str) -> None:
    device = make_device(app, timezone="UTC")
    await engine.add_device(device)

    def change(d: Device) -> None:
        d.timezone = "Europe/Paris"
        raise LookupError("refused")

    with pytest.raises(LookupError, match="refused"):
        await engine.update_device(app, device.id, change)
    assert await engine.get_device(app, device.id) == device
    # The engine is still usable afterwards (a Redis connection was not left watching).
    assert await engine.update_device(app, device.id, lambda d: None) == (device, None)


async def test_change_may_not_move_the_device(engine: Engine, app: str) -> None:
    device = make_device(app)
    await engine.add_device(device)

    def readdress(d: Device) -> None:
        d.address = "token-2"

    with pytest.raises(ValueError, match="cannot change"):
        await engine.update_device(app, device.id, readdress)
    assert await engine.get_device(app, device.id) == device
    assert await engine.find_device(app, "ios", "token-2") is None


async def test_concurrent_updates_lose_nothing(engine: Engine, app: str) -> None:
    device = make_device(app, tags={"seen": []})
    await engine.add_device(device)
    tags = [f"t{n:02}" for n in range(20)]

    def tagger(tag: str) -> Any:
        def change(d: Device) -> str:
            d.tags["seen"].append(tag)
            return tag

        return change

    # Half through a second worker's connections: updates truly overlap in the store.
    async with sibling(engine) as other:
        answers = await asyncio.gather(
            *(
                (engine if n % 2 else other).update_device(app, device.id, tagger(tag))
                for n, tag in enumerate(tags)
            )
        )

    assert sorted(answer[1] for answer in answers if answer is not None) == tags
    stored = await engine.get_device(app, device.id)
    assert stored is not None
    assert sorted(stored.tags["seen"]) == tags


async def test_records_are_copies(engine: Engine, app: str) -> None:
    # Only update_device may change a stored device, whatever callers do to their objects.
    device = make_device(app, tags={"a": ["1"]})
    await engine.add_device(device)
    device.tags["a"].append("changed after add")
    device.opt_in = False

    fetched = await engine.get_device(app, device.id)
    assert fetched is not None
    fetched.tags["a"].append("changed without update")
    found = await engine.find_device(app, "ios", "token-1")
    assert found is not None
    found.timezone = "changed without update"

    answer = await engine.update_device(app, device.id, lambda d: d.identifiers.update(u="1"))
    assert answer is not None
    answer[0].identifiers["u"] = "changed after update"

    again = await engine.get_device(app, device.id)
    assert again is not None
    assert (again.tags, again.opt_in, again.timezone) == ({"a": ["1"]}, True, None)
    assert again.identifiers == {"u": "1"}


async def test_delete_forgets_device_address_and_connection(engine: Engine, app: str) -> None:
    worker = f"{app}-w1"
    await engine.report_presence(worker, {}, ttl=60)
    device = make_device(app)
    kept = make_device(app, "token-2")
    await engine.add_device(device)
    await engine.add_device(kept)
    await engine.set_connection(app, device.id, f"{worker}/1")
    await engine.set_connection(app, kept.id, f"{worker}/2")

    assert await engine.delete_device(app, device.id) == device
    assert await engine.delete_device(app, device.id) is None
    assert await engine.get_device(app, device.id) is None
    assert await engine.find_device(app, "ios", "token-1") is None
    assert await engine.connections(app, [device.id, kept.id]) == {kept.id: f"{worker}/2"}
    assert await engine.get_device(app, kept.id) == kept

    # The address is free again: a new device takes it.
    fresh = make_device(app)
    assert await engine.add_device(fresh) is None
    assert await engine.find_device(app, "ios", "token-1") == fresh
    assert await engine.delete_device(f"{app}-other", fresh.id) is None


async def test_set_and_clear_connection(engine: Engine, app: str) -> None:
    worker = f"{app}-w1"
    await engine.report_presence(worker, {}, ttl=60)
    device = make_device(app)
    await engine.add_device(device)
    assert await engine.connections(app, []) == {}
    assert await engine.connections(app, [device.id, "dev-missing"]) == {}

    await engine.set_connection(app, device.id, f"{worker}/1")
    assert await engine.connections(app, [device.id, "dev-missing"]) == {device.id: f"{worker}/1"}
    # A newer connection takes the device over; the old one's goodbye must not undo that.
    await engine.set_connection(app, device.id, f"{worker}/2")
    await engine.clear_connection(app, device.id, f"{worker}/1")
    assert await engine.connections(app, [device.id]) == {device.id: f"{worker}/2"}
    assert await engine.connections(f"{app}-other", [device.id]) == {}

    await engine.clear_connection(app, device.id, f"{worker}/2")
    assert await engine.connections(app, [device.id]) == {}


async def test_connections_of_dead_workers_are_not_answered(engine: Engine, app: str) -> None:
    live, dying, unknown = f"{app}-live", f"{app}-dying", f"{app}-unknown"
    await engine.report_presence(live, {}, ttl=60)
    await engine.report_presence(dying, {}, ttl=0.05)
    await engine.set_connection(app, "d1", f"{live}/1")
    await engine.set_connection(app, "d2", f"{dying}/1")
    await engine.set_connection(app, "d3", f"{unknown}/1")
    await asyncio.sleep(scaled(0.2))

    answered = await engine.connections(app, ["d1", "d2", "d3"])
    if isinstance(engine, MemoryEngine):
        # One process, one worker: every connection it recorded is its own, and live.
        assert answered == {"d1": f"{live}/1", "d2": f"{dying}/1", "d3": f"{unknown}/1"}
    else:
        assert answered == {"d1": f"{live}/1"}


async def test_refresh_keeps_a_report_and_its_worker_fresh(engine: Engine, app: str) -> None:
    worker = f"{app}-w1"
    await engine.report_presence(worker, {f"{app}|lobby": 2}, ttl=scaled(0.3))
    await engine.set_connection(app, "d1", f"{worker}/1")
    assert await engine.refresh_presence(worker, ttl=60) is True
    await asyncio.sleep(scaled(0.5))

    # Past the first report's ttl, both the counts and the worker's liveness still stand.
    async with sibling(engine) as other:
        counted = await other.presence(app, "lobby", exclude=f"{app}-w2")
        assert counted == (0 if isinstance(engine, MemoryEngine) else 2)
    assert await engine.connections(app, ["d1"]) == {"d1": f"{worker}/1"}


async def test_refresh_tells_when_no_report_is_held(engine: Engine, app: str) -> None:
    expiring, empty = f"{app}-expiring", f"{app}-empty"
    await engine.report_presence(expiring, {f"{app}|lobby": 1}, ttl=0.05)
    await engine.report_presence(empty, {}, ttl=60)
    await asyncio.sleep(scaled(0.2))

    if isinstance(engine, MemoryEngine):
        # Nothing is shared between workers, so nothing is ever lost.
        assert await engine.refresh_presence(expiring, ttl=60) is True
    else:
        # The caller must report in full: the counts expired, or there were none.
        assert await engine.refresh_presence(expiring, ttl=60) is False
        assert await engine.refresh_presence(empty, ttl=60) is False
        assert await engine.refresh_presence(f"{app}-never", ttl=60) is False
