"""The servers the benchmark compares, and one running instance of one of them.

A `Target` is Herald on the memory engine, Herald on the Redis engine (one
worker), or one of the reference servers in ``bench/`` (fed through Redis
pub/sub). `Session.start` starts it (and its redis-server) on the server
CPU for one scenario; `Session.stop` stops everything it started. `Mark`
is a snapshot of the CPU time every side has used, taken around each
measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from bench.httpload import build_request, fetch, fetch_many
from bench.loadgen import Totals, open_client
from bench.procs import (
    RESULTS,
    Proc,
    cpu_seconds,
    free_port,
    log_problems,
    machine_busy_seconds,
    sleeps,
    start_herald,
    start_redis,
    start_reference,
    wait_port,
)
from bench.resp import call

__all__ = ["TARGETS", "Mark", "Session", "Target", "loadavg", "usage"]

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Target:
    """One server to measure."""

    name: str
    kind: Literal["herald", "reference"]
    engine: Literal["memory", "redis"] = "redis"
    script: Path | None = None

    @property
    def herald(self) -> bool:
        """Whether this is Herald (fed through its own publish path)."""
        return self.kind == "herald"

    def missing(self) -> str | None:
        """Why this target cannot run here (its script is not written yet), or None."""
        if self.script is not None and not self.script.exists():
            return f"{self.script.relative_to(BENCH.parent)} does not exist"
        return None


TARGETS = {
    target.name: target
    for target in (
        Target("herald-memory", "herald", "memory"),
        Target("herald-redis", "herald", "redis"),
        Target("ref-websockets", "reference", script=BENCH / "ref_websockets.py"),
        Target("ref-starlette", "reference", script=BENCH / "ref_starlette.py"),
        Target("ref-floor", "reference", script=BENCH / "ref_floor.py"),
    )
}
"""Every target, by the name ``--targets`` takes."""


@dataclass(frozen=True)
class Mark:
    """CPU seconds used so far by each side, and when."""

    wall: float
    server: float
    redis: float
    loadgen: float
    machine: float
    server_sleeps: int = 0
    loadgen_sleeps: int = 0


def usage(before: Mark, after: Mark) -> dict[str, float]:
    """CPU use between two marks, as percentages of one core (and the raw seconds)."""
    wall = max(after.wall - before.wall, 1e-9)
    server = after.server - before.server
    redis = after.redis - before.redis
    loadgen = after.loadgen - before.loadgen
    other = max(0.0, after.machine - before.machine - server - redis - loadgen)
    return {
        "window_s": round(wall, 3),
        "server_cpu_s": round(server, 3),
        "redis_cpu_s": round(redis, 3),
        "loadgen_cpu_s": round(loadgen, 3),
        "server_cpu_pct": 100.0 * server / wall,
        "redis_cpu_pct": 100.0 * redis / wall,
        "loadgen_cpu_pct": 100.0 * loadgen / wall,
        "other_cpu_pct": 100.0 * other / wall,
        # Each sleep of one side is a wake-up the other side's writes paid for.
        "server_sleeps_per_s": (after.server_sleeps - before.server_sleeps) / wall,
        "loadgen_sleeps_per_s": (after.loadgen_sleeps - before.loadgen_sleeps) / wall,
    }


@dataclass
class Session:
    """A target running for one scenario: its server, its redis-server, how to reach it."""

    target: Target
    server: Proc
    port: int
    key: str
    redis: Proc | None = None
    redis_url: str | None = None
    batch_publish: bool = False
    """Herald: whether ``POST /v1/publish`` exists (it answered 200 to a probe)."""
    notes: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, target: Target, label: str, pin: bool) -> Session:
        """Start the target (and its redis-server) and wait until it answers."""
        stem = f"run-{target.name}-{label}"
        redis: Proc | None = None
        redis_url: str | None = None
        server: Proc | None = None
        try:
            if target.kind == "reference" or target.engine == "redis":
                redis, redis_url = start_redis(RESULTS / f"{stem}-redis.log", pin)
            port = free_port()
            if target.herald:
                key = "bench-" + secrets.token_urlsafe(24)
                log = RESULTS / f"{stem}-server.log"
                server = start_herald(port, key, log, pin, redis_url)
            else:
                assert target.script is not None
                assert redis_url is not None
                key = "bench"
                log = RESULTS / f"{stem}-server.log"
                server = start_reference(target.script, port, redis_url, log, pin)
            session = cls(target, server, port, key, redis, redis_url)
            await session.wait_ready()
        except BaseException:
            if server is not None:
                server.stop()
            if redis is not None:
                redis.stop()
            raise
        return session

    async def wait_ready(self, within: float = 30.0) -> None:
        """Wait until the server takes WebSocket connects; Herald: probe the batch endpoint."""
        await asyncio.to_thread(wait_port, self.server, self.port, within)
        deadline = time.monotonic() + within
        while True:
            try:
                # One WebSocket client through connect: every code path is warm and loaded.
                client = await open_client(Totals(), self.port, "publisher", "", self.key, 5.0)
                client.close()
                break
            except (OSError, TimeoutError) as exc:
                if time.monotonic() > deadline or not self.server.alive():
                    raise RuntimeError(
                        f"{self.target.name} does not answer WebSocket connects ({exc!r}); "
                        f"see {self.server.log_path}"
                    ) from exc
                await asyncio.sleep(0.1)
        if self.target.herald:
            probe = orjson.dumps([{"channel": "bench-probe-none", "payload": "x"}])
            status, _ = await fetch(self.port, "POST", "/v1/publish", self.key, probe)
            self.batch_publish = status == 200

    def mark(self) -> Mark:
        """Snapshot of the CPU time used so far."""
        pids = self.server.pids()
        return Mark(
            wall=time.perf_counter(),
            server=cpu_seconds(pids),
            redis=self.redis.cpu_seconds() if self.redis is not None else 0.0,
            loadgen=time.process_time(),
            machine=machine_busy_seconds(),
            server_sleeps=sleeps(pids),
            loadgen_sleeps=resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw,
        )

    async def create_channels(self, names: list[str]) -> None:
        """Herald: ``POST /v1/channels`` for each name (over a few keep-alive connections)."""
        requests = [
            build_request("POST", "/v1/channels", self.port, self.key, orjson.dumps({"name": name}))
            for name in names
        ]
        answers = await fetch_many(self.port, requests, concurrency=8)
        failed = [(status, body) for status, body in answers if status != 201]
        if failed:
            status, body = failed[0]
            raise RuntimeError(
                f"creating {len(failed)} of {len(names)} channels failed: {status} {body[:200]!r}"
            )

    async def wait_redis_subscribed(self, channels: list[str], within: float = 20.0) -> int:
        """Reference: wait until the server listens on every channel; how many do."""
        assert self.redis_url is not None
        deadline = time.monotonic() + within
        listening = 0
        while True:
            reply = await call(
                self.redis_url, b"PUBSUB", b"NUMSUB", *(c.encode() for c in channels)
            )
            counts = reply[1::2] if isinstance(reply, list) else []
            listening = sum(1 for count in counts if isinstance(count, int) and count > 0)
            if listening == len(channels) or time.monotonic() > deadline:
                return listening
            await asyncio.sleep(0.1)

    def stop(self) -> dict[str, Any]:
        """Stop the server and its redis-server; their exit codes and log problems."""
        outcome: dict[str, Any] = {"server_exit_code": self.server.stop()}
        if self.redis is not None:
            outcome["redis_exit_code"] = self.redis.stop()
        problems = log_problems(self.server.log_path)
        outcome["server_log"] = str(self.server.log_path)
        outcome["log_problems"] = len(problems)
        outcome["log_problem_examples"] = problems[:5]
        return outcome


def loadavg() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages."""
    with contextlib.suppress(OSError):
        return os.getloadavg()
    return (0.0, 0.0, 0.0)
