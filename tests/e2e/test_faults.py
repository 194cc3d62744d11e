"""Faults on the Redis engine, and clients that reconnect with ``since`` losing nothing.

A worker killed with SIGKILL, a server restarted under 2,000 sockets, and Redis
killed and restarted on its append-only file: after each, every client that
reconnects with ``since`` (the last id it saw) must end up with every stored
message exactly once, in order. ``test_redis.py`` covers a Redis outage under a
socket that stays open and the pub/sub link alone being cut; these tests
cover the faults that drop the sockets themselves, and what Redis keeps.

The subscribers here use `MiniSocket`, a bare herald.json client on asyncio
streams: two thousand ``websockets`` clients, each with its keepalive task,
would cost the test more CPU than the server it checks.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Api, Frame, WSClient, open_api, open_socket
from tests.e2e.minisocket import MiniSocket
from tests.support import (
    RedisProcess,
    ServerProcess,
    scaled,
    start_redis,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.redis

_DROPPED = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
"""What a socket raises when the server goes away (reset, refused, end of stream)."""


def order(message_id: str) -> tuple[int, int]:
    """Sort key of a stream id ``<ms>-<seq>``."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)


@dataclass
class Follower:
    """A subscriber that reconnects with ``since`` whenever its socket drops.

    ``ids`` is every message it received, across all its connections; the
    tests compare it with the channel's whole history at the end.
    """

    port: int
    key: str
    channel: str
    ids: list[str] = field(default_factory=list)
    last: str | None = None
    """``since`` for the next subscribe: the newest id seen, or the first subscribe's offset."""
    epoch: str | None = None
    worker: str = ""
    """The ``server`` (``host:pid``) of the current or last connection."""
    connects: int = 0
    drops: int = 0
    """Connections that ended under it (server close, reset, end of stream)."""
    failed_attempts: int = 0
    """Connects that did not get as far as ``subscribed`` (refused while a server was down)."""
    recovered: list[bool] = field(default_factory=list)
    """The ``recovered`` of each subscribe with ``since``."""

    async def connect(self) -> MiniSocket:
        """Connect and subscribe (with ``since`` once it has seen the channel).

        Raises `TimeoutError` (an `OSError`, so a retry) when a server that is
        going away takes the connection and never answers.
        """
        async with asyncio.timeout(scaled(10)):
            sock = await MiniSocket.open(self.port)
        try:
            subscribe: Frame = {"op": "subscribe", "id": 2, "channel": self.channel}
            if self.last is not None:
                subscribe["since"] = self.last
            if self.epoch is not None:
                subscribe["epoch"] = self.epoch
            # Pipelined, as a reconnecting client in a hurry would.
            sock.send({"op": "connect", "id": 1, "key": self.key}, subscribe)
            async with asyncio.timeout(scaled(10)):
                connected = await sock.recv()
                assert connected["op"] == "connected", connected
                subscribed = await sock.recv()
                assert subscribed["op"] == "subscribed", subscribed
        except BaseException:
            sock.close()
            raise
        self.connects += 1
        self.worker = connected["server"]
        position = subscribed["position"]
        if self.last is None:
            self.last = position["offset"]
        else:
            self.recovered.append(subscribed["recovered"])
        if self.epoch is None:
            self.epoch = position["epoch"]
        # A new epoch would mean the history was lost and rebuilt.
        assert position["epoch"] == self.epoch, (position, self.epoch)
        return sock

    async def follow(self, sock: MiniSocket) -> None:
        """Read messages for ever; on a drop, reconnect with jittered backoff and go on."""
        while True:
            try:
                while True:
                    frame = await sock.recv()
                    assert frame["op"] == "message", frame
                    self.ids.append(frame["id"])
                    self.last = frame["id"]
            except _DROPPED:
                self.drops += 1
            finally:
                sock.close()
            # Jittered exponential backoff, as real clients do, so that refused
            # attempts while the server is down do not swamp this loop.
            delay = 0.1
            while True:
                try:
                    sock = await self.connect()
                    break
                except _DROPPED:
                    self.failed_attempts += 1
                    await asyncio.sleep(random.uniform(delay / 2, delay))
                    delay = min(delay * 2, 1.0)


def raise_nofile(needed: int) -> None:
    """Raise this process's soft open-files limit to ``needed`` if the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def worker_pids(server: ServerProcess) -> set[int]:
    """The live worker processes of a ``--workers N`` server, from /proc.

    uvicorn's supervisor also forks multiprocessing's resource tracker, so a
    worker is a child whose command line runs ``spawn_main``.
    """
    parent = server.proc.pid
    children: set[int] = set()
    listed = list(Path(f"/proc/{parent}/task").glob("*/children"))
    if listed:
        for path in listed:
            children.update(int(pid) for pid in path.read_text().split())
    else:  # kernels without CONFIG_PROC_CHILDREN: look for the parent in every stat
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The parent pid is the second field after the (parenthesised) command name.
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                children.add(int(entry.name))
    workers = set()
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"spawn_main" in cmdline and state != "Z":
            workers.add(pid)
    return workers


def pid_of(worker: str) -> int:
    """The pid in a ``connected`` frame's ``server`` (``host:pid``)."""
    return int(worker.rsplit(":", 1)[1])


async def history(api: Api, channel: str) -> list[str]:
    """Every id the channel's history holds, oldest first, page by page."""
    ids: list[str] = []
    while True:
        params = {"since": ids[-1]} if ids else {}
        page = await api.history_ids(channel, **params)
        if not page:
            return ids
        ids += page


async def until_caught_up(
    followers: list[Follower], tasks: list[asyncio.Task[None]], count: int, seconds: float
) -> None:
    """Wait until every follower holds ``count`` messages; a follower that failed fails this."""

    async def caught_up() -> bool:
        for task in tasks:
            if task.done():
                task.result()  # re-raises what went wrong in it
                raise AssertionError("a follower stopped")
        return all(len(f.ids) >= count for f in followers)

    await wait_until(caught_up, seconds=seconds, interval=0.1)


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the followers and wait until they have closed their sockets."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def assert_each_got_exactly(followers: list[Follower], expected: list[str]) -> None:
    """Every follower got ``expected``: none missing, none twice, in order."""
    assert len(set(expected)) == len(expected)
    for f in followers:
        if f.ids != expected:
            got = set(f.ids)
            missing = [i for i in expected if i not in got]
            twice = len(f.ids) - len(got)
            pytest.fail(
                f"follower on {f.worker} (connects {f.connects}): {len(missing)} missing "
                f"(first {missing[:3]}), {twice} duplicates, {len(f.ids)}/{len(expected)}"
            )
        assert all(f.recovered), f.recovered


@dataclass
class Publisher:
    """Publishes numbered messages over HTTP until stopped; keeps the acknowledged ids.

    A request that fails on a dying worker is not acknowledged; it may still
    have been stored, which is why the tests compare clients with the history
    and check that it holds every acknowledged id.
    """

    api: Api
    channel: str
    pause: float = 0.0
    acked: list[str] = field(default_factory=list)
    failed: int = 0
    running: bool = True

    async def run(self) -> None:
        """Publish one message at a time until ``running`` goes false."""
        n = 0
        while self.running:
            try:
                response = await self.api.http.post(
                    f"/v1/channels/{self.channel}/publish", json={"payload": {"n": n}}
                )
            except httpx.TransportError:
                self.failed += 1
            else:
                if response.status_code == 201:
                    self.acked.append(response.json()["data"]["id"])
                else:
                    assert response.status_code == 503, response.text
                    self.failed += 1
            n += 1
            await asyncio.sleep(self.pause)


async def test_sigkill_of_one_worker_loses_nothing_for_clients_that_recover(
    two_workers: ServerProcess, channel_name: str
) -> None:
    per_worker = 8
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(open_api(two_workers))
        await api.create_channel(channel_name, history_size=100_000)
        workers = worker_pids(two_workers)
        assert len(workers) == 2, workers

        # Spread the subscribers evenly: the kernel hands each accept to either worker.
        followers: list[Follower] = []
        sockets: list[MiniSocket] = []
        held: dict[str, int] = {}
        async with asyncio.timeout(scaled(20)):
            while len(followers) < 2 * per_worker:
                follower = Follower(two_workers.port, two_workers.key, channel_name)
                sock = await follower.connect()
                if held.get(follower.worker, 0) < per_worker:
                    held[follower.worker] = held.get(follower.worker, 0) + 1
                    followers.append(follower)
                    sockets.append(sock)
                else:
                    sock.close()
        assert {pid_of(name) for name in held} == workers
        tasks = [asyncio.create_task(f.follow(s)) for f, s in zip(followers, sockets, strict=True)]
        stack.push_async_callback(stop_tasks, tasks)

        publisher = Publisher(api, channel_name, pause=0.002)
        publishing = asyncio.create_task(publisher.run())
        await asyncio.sleep(1.0)
        victim_name = followers[0].worker
        victim = pid_of(victim_name)
        on_victim = [f for f in followers if f.worker == victim_name]
        os.kill(victim, signal.SIGKILL)

        async def victims_back() -> bool:
            return all(f.connects >= 2 for f in on_victim)

        await wait_until(victims_back, seconds=15)

        # uvicorn's supervisor (>= 0.30) replaces the dead worker.
        async def replaced() -> bool:
            current = worker_pids(two_workers)
            return len(current) == 2 and victim not in current

        await wait_until(replaced, seconds=15, interval=0.1)
        await asyncio.sleep(1.0)  # keep publishing with the new worker in the game
        publisher.running = False
        await publishing
        assert publisher.acked

        stored = await history(api, channel_name)
        assert set(publisher.acked) <= set(stored)
        assert stored == sorted(stored, key=order)
        await until_caught_up(followers, tasks, len(stored), seconds=30)
        # Let anything extra (a duplicate) arrive before judging.
        await asyncio.sleep(0.3)
        assert_each_got_exactly(followers, stored)
        for f in followers:
            on_dead = f in on_victim
            assert f.drops == (1 if on_dead else 0), (f.worker, f.drops)
            assert len(f.recovered) == (1 if on_dead else 0)

        # The replacement worker recovers history too.
        async with asyncio.timeout(scaled(20)):
            while True:
                late = Follower(two_workers.port, two_workers.key, channel_name, last="0-0")
                late.epoch = followers[0].epoch
                sock = await late.connect()
                if pid_of(late.worker) not in workers:
                    break
                sock.close()
        task = asyncio.create_task(late.follow(sock))
        stack.push_async_callback(stop_tasks, [task])
        await until_caught_up([late], [task], len(stored), seconds=10)
        assert_each_got_exactly([late], stored)
        print(
            f"\n{len(followers)} clients, {len(on_victim)} on the killed worker: "
            f"{len(publisher.acked)} publishes acknowledged, {publisher.failed} failed, "
            f"{len(stored)} stored; each client got all {len(stored)} once"
        )
        assert "Traceback" not in two_workers.log()


async def terminate(server: ServerProcess) -> None:
    """SIGTERM, then wait for a clean exit without blocking the loop: the server's
    graceful shutdown waits for the clients to answer its close frames."""
    server.proc.send_signal(signal.SIGTERM)

    async def exited() -> bool:
        return server.proc.poll() is not None

    await wait_until(exited, seconds=20)
    assert server.proc.returncode == 0, server.log()


def restart(server: ServerProcess) -> ServerProcess:
    """Run the same ``herald serve`` command again: same port, same Redis, same key."""
    env = {**os.environ, "HERALD_ADMIN_KEY": server.key}
    with server.log_path.open("ab") as log:
        proc = subprocess.Popen(server.args, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, server.port, server.key, server.log_path, server.args)


async def until_healthy(api: Api, server: ServerProcess) -> None:
    """Poll /healthz without blocking the loop the clients run on."""

    async def healthy() -> bool:
        assert server.proc.poll() is None, server.log()
        try:
            return await api.healthy()
        except httpx.TransportError:
            return False

    await wait_until(healthy, seconds=20, interval=0.05)


async def test_reconnect_storm_after_a_restart_recovers_exactly_the_gap(
    tmp_path: Path, fresh_redis: RedisProcess, channel_name: str
) -> None:
    clients, concurrency = 2000, 200
    raise_nofile(2 * clients + 500)  # both ends of each socket: the servers inherit it
    # Both start at once (waiting here, not in start_server, saves a start-up time).
    servers = [start_server(tmp_path, "--redis", fresh_redis.url, "--workers", "2", wait=False)]
    # Another node on the same Redis publishes while the first one is down.
    publisher_node = start_server(tmp_path, "--redis", fresh_redis.url, wait=False)
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(open_api(publisher_node))
            async with open_api(servers[0]) as storm_api:
                await asyncio.gather(
                    until_healthy(api, publisher_node), until_healthy(storm_api, servers[0])
                )
            await api.create_channel(channel_name, history_size=1000)
            port, key = servers[0].port, servers[0].key
            followers = [Follower(port, key, channel_name) for _ in range(clients)]
            gate = asyncio.Semaphore(concurrency)

            async def first_connect(follower: Follower) -> MiniSocket:
                async with gate:
                    return await follower.connect()

            started = time.monotonic()
            sockets = await asyncio.gather(*(first_connect(f) for f in followers))
            opened = time.monotonic() - started
            tasks = [
                asyncio.create_task(f.follow(s)) for f, s in zip(followers, sockets, strict=True)
            ]
            stack.push_async_callback(stop_tasks, tasks)
            before = await api.publish_many(channel_name, 5)
            await until_caught_up(followers, tasks, len(before), seconds=20)

            await terminate(servers[0])
            gap = await api.publish_many(channel_name, 20)
            restarted_at = time.monotonic()
            servers.append(restart(servers[0]))
            async with open_api(servers[-1]) as restarted_api:
                await until_healthy(restarted_api, servers[-1])
            # Published while the storm reconnects: some recover it, some get it live.
            during = await api.publish_many(channel_name, 5)

            expected = before + gap + during
            await until_caught_up(followers, tasks, len(expected), seconds=60)
            storm = time.monotonic() - restarted_at
            await asyncio.sleep(0.3)
            assert await history(api, channel_name) == expected
            assert_each_got_exactly(followers, expected)
            # Usually one drop each; a client that lands on the second worker in the
            # instant before that one shuts down too is dropped twice, and recovers twice.
            assert all(f.drops >= 1 and len(f.recovered) == f.drops for f in followers)
            retries = sum(f.failed_attempts for f in followers)
            print(
                f"\n{clients} clients: opened in {opened:.1f} s; after the restart all "
                f"recovered {len(gap)} + {len(during)} messages within {storm:.1f} s "
                f"({retries} refused attempts while it was down)"
            )
        for server in servers:
            assert "Traceback" not in server.log()
    finally:
        for server in servers:
            server.stop()
        publisher_node.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis with ``appendonly yes`` (fsync always): a restart loses nothing acknowledged."""
    proc = start_redis(tmp_path, appendonly=True)
    yield proc
    proc.stop()


async def call(api: Api, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    """One API call that must answer ``status``; its ``data``."""
    response = await api.http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    return response.json()["data"]


async def connect_user(server: ServerProcess, token: str, stack: AsyncExitStack) -> WSClient:
    """A socket connected with a user token."""
    client = await stack.enter_async_context(open_socket(server))
    answer = await client.request({"op": "connect", "id": 1, "token": token})
    assert answer["op"] == "connected", answer
    return client


async def test_redis_restart_on_its_aof_keeps_every_record_and_recovery(
    tmp_path: Path, durable_redis: RedisProcess, channel_name: str
) -> None:
    server = start_server(tmp_path, "--redis", durable_redis.url)
    try:
        async with open_api(server) as api:
            created = await api.create_channel(
                channel_name, history_size=500, description="kept",
                annotations=[{"type": "k", "value": "v"}],
            )  # fmt: skip
            key = await call(api, "POST", "/v1/keys", 201, json={"scopes": ["publish"]})
            device = {"address": "toy-1", "platform": "toy", "tags": ["toaster"]}
            registered = await call(api, "POST", "/v1/devices", 201, json={"device": device})
            device_id = registered["device_id"]
            change = {"audience": {"device_id": device_id}, "add": {"colour": ["red"]}}
            await call(api, "POST", "/v1/devices/tags", json=change)
            subscribers = f"/v1/channels/{channel_name}/subscribers"
            await call(api, "POST", subscribers, 201, json={"device_id": device_id})
            token = (await call(api, "POST", "/v1/tokens", 201, json={"user_id": "ann"}))["token"]
            async with AsyncExitStack() as stack:
                user = await connect_user(server, token, stack)
                await user.subscribe(channel_name, persist=True)

            # A subscriber sees some messages and goes away; more are published.
            seen = await api.publish_many(channel_name, 5)
            follower = Follower(server.port, server.key, channel_name, last="0-0")
            sock = await follower.connect()
            epoch = follower.epoch
            for expected in seen:
                assert (await asyncio.wait_for(sock.recv(), scaled(5)))["id"] == expected
            sock.close()
            missed = await api.publish_many(channel_name, 3)
            channel_before = await call(api, "GET", f"/v1/channels/{channel_name}")
            device_before = await call(api, "GET", f"/v1/devices/{device_id}")
            assert device_before["tags"]["colour"] == ["red"]

            durable_redis.kill()
            durable_redis.start()

            async def ready() -> bool:
                return (await api.http.get("/readyz")).status_code == 200

            await wait_until(ready, seconds=20, interval=0.1)
            missed += await api.publish_many(channel_name, 2)

            # The records: channel, app key, device and tags, persistent subscribers.
            channel_after = await call(api, "GET", f"/v1/channels/{channel_name}")
            assert channel_after["id"] == created["id"]
            for name in ("description", "annotations", "history_size", "readers", "owner"):
                assert channel_after.get(name) == channel_before.get(name), name
            published = await call(
                api,
                "POST",
                f"/v1/channels/{channel_name}/publish",
                201,
                json={"payload": "with the app key"},
                headers={"Authorization": f"Bearer {key['key']}"},
            )
            missed.append(published["id"])
            assert await call(api, "GET", f"/v1/devices/{device_id}") == device_before
            listed = await call(api, "GET", subscribers)
            assert len(listed) == 2, listed
            assert {"type": "device", "device_id": device_id, "active": False} in listed
            assert {"type": "user", "user_id": "ann"} in listed

            # History, and recovery across the restart: the same epoch, nothing missing.
            assert await history(api, channel_name) == seen + missed
            follower.last = seen[-1]
            sock = await follower.connect()
            assert follower.recovered == [True, True]
            assert follower.epoch == epoch
            for expected in missed:
                assert (await asyncio.wait_for(sock.recv(), scaled(5)))["id"] == expected
            sock.close()

            async with AsyncExitStack() as stack:
                # The device key still connects and resumes its subscription...
                toy = await stack.enter_async_context(open_socket(server))
                connect = {"op": "connect", "id": 1, "connection_key": registered["connection_key"]}
                assert (await toy.request(connect))["device_id"] == device_id
                resumed = await toy.recv()
                assert (resumed["op"], resumed["channel"]) == ("subscribed", channel_name)
                # ...and its tags still select it.
                red = {"tag": "red", "group": "colour"}
                targeted = await api.publish(channel_name, "red", audience=red)
                assert await toy.message_ids(1) == [targeted]
                # The user's persistent subscription is resumed on a new connection.
                user = await connect_user(server, token, stack)
                resumed = await user.recv()
                assert (resumed["op"], resumed["channel"]) == ("subscribed", channel_name)
        assert "Traceback" not in server.log()
    finally:
        server.stop()
