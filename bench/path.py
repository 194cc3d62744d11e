"""The publish-to-fan-out path of one worker, in one process, without sockets.

`bench/run.py` S2 (10,000 channels x 1 subscriber, batch publishes) is bound
by two things: one ``send()`` per delivery, which the kernel charges, and
Herald's own Python work per message. This measures the second alone, so a
change to the path can be judged without the noise of a whole run: the
Herald app is called as ASGI (``POST /v1/publish``, 1,000 items a request)
and its subscribers are real `Connection` objects whose transport counts
writes instead of making them.

    .venv/bin/python bench/path.py                  # CPU microseconds per message
    .venv/bin/python bench/path.py --engine redis   # with a throwaway redis-server
    .venv/bin/python bench/path.py --instructions   # under valgrind: exact, not timed

With ``--engine redis`` the figure is the worker's CPU only (publish pipeline,
pub/sub reading, fan-out); Redis runs in its own process. ``--instructions``
runs the worker under callgrind twice (set-up only, then set-up and the
batches) and prints the difference per message: the same code gives the same
count on a busy machine, which timing does not. With ``--engine redis`` the
count is the worker's alone and varies a little between runs (how Redis's
replies arrive in reads depends on timing).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/path.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import RESULTS, Proc, cpu_seconds, start_redis
from herald.app import create_app
from herald.config import Settings
from herald.models import Topic
from herald.node import Node
from herald.transport import Connection

_KEY = "bench-path-admin-key-0123456789abcdef"
_BATCH = 1000
_PAYLOAD = "x" * 64


class Writes:
    """Writes made to every `CountingTransport` sharing this (read without a walk)."""

    def __init__(self) -> None:
        self.count = 0


class CountingTransport:
    """Stands in for a socket: counts the writes Herald makes."""

    def __init__(self, writes: Writes) -> None:
        self.writes = writes

    def is_closing(self) -> bool:
        """Never closing."""
        return False

    def get_write_buffer_size(self) -> int:
        """Nothing ever waits to be sent."""
        return 0

    def writelines(self, frames: list[bytes]) -> None:
        """Count one write."""
        self.writes.count += 1

    def write(self, data: bytes) -> None:
        """Count one write."""
        self.writes.count += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A loopback peer."""
        return ("127.0.0.1", 1) if name == "peername" else default


class InProcess:
    """One in-process Herald with ``channels`` channels of one subscriber each."""

    def __init__(self, settings: Settings, channels: int, *, minimal: bool = False) -> None:
        self.app = create_app(settings)
        self.minimal = minimal
        self.state: dict[str, Any] = {}
        self.names = [f"c{i}" for i in range(channels)]
        self.writes = Writes()
        self._sequence = 0

    async def start(self) -> Node:
        """Run the lifespan, create the channels, subscribe one connection to each."""
        started = asyncio.get_running_loop().create_future()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set_result(None)
            elif message["type"] == "lifespan.startup.failed":
                started.set_exception(RuntimeError(message.get("message")))

        scope = {"type": "lifespan", "state": self.state, "asgi": {"version": "3.0"}}
        self._lifespan = asyncio.ensure_future(self.app(scope, inbox.get, send))
        await started
        node: Node = self.state["node"]
        for name in self.names:
            status, body = await self.call("/v1/channels", orjson.dumps({"name": name}))
            if status != 201:
                raise RuntimeError(f"creating {name}: {status} {body[:200]!r}")
        app = (await node.authenticate(_KEY)).app
        server_state = SimpleNamespace(connections=set())
        for name in self.names:
            connection = Connection(None, server_state, {"node": node})
            transport = CountingTransport(self.writes)
            connection.transport = transport  # type: ignore[assignment]
            connection.open = True
            topic = Topic(app, name)
            await node.engine.subscribe(topic)
            node.hub.begin(topic, connection)
            node.hub.activate(topic, connection, "0-0")
        return node

    async def call(self, path: str, body: bytes) -> tuple[int, bytes]:
        """One POST through the whole ASGI app."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"authorization", f"Bearer {_KEY}".encode()),
                (b"content-type", b"application/json"),
                *([(b"prefer", b"return=minimal")] if self.minimal else []),
            ],
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "state": dict(self.state),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # no disconnect while the request runs
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    def batch(self) -> bytes:
        """The next ``_BATCH`` publishes, round-robin over the channels (as S2 does)."""
        items = []
        for _ in range(_BATCH):
            items.append({"channel": self.names[self._sequence % len(self.names)]})
            items[-1]["payload"] = _PAYLOAD
            self._sequence += 1
        return orjson.dumps(items)

    def delivered(self) -> int:
        """Writes made so far (one per delivery: each connection gets one frame per batch)."""
        return self.writes.count

    async def publish(self, bodies: list[bytes]) -> None:
        """Publish every batch and wait until each message was written to its subscriber."""
        expected = self.delivered() + len(bodies) * _BATCH
        for body in bodies:
            status, answer = await self.call("/v1/publish", body)
            if status != 200:
                raise RuntimeError(f"batch publish: {status} {answer[:200]!r}")
            await asyncio.sleep(0)  # the hub flushes at the end of the loop iteration
        deadline = time.monotonic() + 30
        while self.delivered() < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{expected - self.delivered()} messages never delivered")
            await asyncio.sleep(0)


async def measure(
    args: argparse.Namespace, redis: Proc | None, redis_url: str | None
) -> dict[str, Any]:
    """Set up, then time ``args.repeats`` runs of ``args.batches`` batches (CPU time)."""
    settings = Settings(admin_key=_KEY, redis_url=redis_url)
    path = InProcess(settings, args.channels, minimal=args.minimal)
    node = await path.start()
    # Warm-up: every channel's first message (a new stream, first-time caches) once.
    warm = [path.batch() for _ in range(-(-args.channels // _BATCH))]
    bodies = [path.batch() for _ in range(args.batches)]
    # As a worker does once started (`herald.app`): what exists now is never collected.
    gc.collect()
    gc.freeze()
    runs: list[float] = []
    redis_us = None
    collection_ms, tracked = 0.0, 0
    pauses = Pauses()
    if args.batches:
        await path.publish(warm)
        gc.callbacks.append(pauses.observe)
        redis_cpu = cpu_seconds([redis.pid]) if redis else 0.0
        for _ in range(args.repeats):
            started = time.process_time()
            await path.publish(bodies)
            runs.append((time.process_time() - started) / (args.batches * _BATCH) * 1e6)
        gc.callbacks.remove(pauses.observe)
        # What a full collection walks once the runs are over (set-up objects are frozen).
        started = time.perf_counter()
        gc.collect()
        collection_ms = (time.perf_counter() - started) * 1000
        tracked = len(gc.get_objects())
        if redis is not None:
            # Over all runs: /proc counts in ticks of 10 ms.
            spent = cpu_seconds([redis.pid]) - redis_cpu
            redis_us = spent / (args.repeats * args.batches * _BATCH) * 1e6
    await node.stop()
    return {
        "engine": "redis" if redis_url else "memory",
        "channels": args.channels,
        "messages_per_run": args.batches * _BATCH,
        "cpu_us_per_message": runs,
        "best": min(runs) if runs else None,
        "redis_cpu_us_per_message": redis_us,
        "collections": pauses.summary(),
        "full_collection_ms": collection_ms,
        "tracked_objects": tracked,
    }


class Pauses:
    """The garbage collector's pauses while the runs publish, per generation."""

    def __init__(self) -> None:
        self._started = 0.0
        self.by_generation: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def observe(self, phase: str, info: dict[str, int]) -> None:
        """A `gc.callbacks` hook: time from each collection's start to its stop."""
        if phase == "start":
            self._started = time.perf_counter()
        else:
            elapsed = (time.perf_counter() - self._started) * 1000
            self.by_generation[info["generation"]].append(elapsed)

    def summary(self) -> dict[str, dict[str, float]]:
        """Count, mean and longest pause (ms) of each generation that was collected."""
        return {
            str(generation): {
                "count": len(pauses),
                "mean_ms": sum(pauses) / len(pauses),
                "max_ms": max(pauses),
            }
            for generation, pauses in self.by_generation.items()
            if pauses
        }


def instructions(args: argparse.Namespace) -> int:
    """Under callgrind: instructions per message, the set-up subtracted."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("--instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    counts = []
    for batches in (0, args.batches):
        command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        command += [sys.executable, __file__, "--channels", str(args.channels)]
        command += ["--engine", args.engine]
        command += ["--minimal"] if args.minimal else []
        command += ["--batches", str(batches), "--repeats", "1", "--quiet"]
        # Hash seeds decide dict layouts; fixed, two runs of the same code count the same.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or not found:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        counts.append(int(found[1]))
    # The measured batches, plus the warm-up: one message to each channel.
    messages = (args.batches + -(-args.channels // _BATCH)) * _BATCH
    print(
        f"{args.engine} engine, {args.channels:,} channels x 1 subscriber, {_BATCH}-item "
        f"batches: {(counts[1] - counts[0]) / messages:,.0f} instructions per message"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, measure, print one line (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("memory", "redis"), default="memory")
    parser.add_argument("--channels", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20, help="1,000-item batches per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best is reported")
    parser.add_argument("--instructions", action="store_true", help="count under callgrind")
    parser.add_argument(
        "--minimal", action="store_true", help="publish with Prefer: return=minimal (ids alone)"
    )
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instructions:
        args.channels = min(args.channels, 2_000)  # callgrind is some 50x slower
        return instructions(args)
    redis = None
    redis_url = None
    if args.engine == "redis":
        if shutil.which("redis-server") is None:
            print("--engine redis needs redis-server", file=sys.stderr)
            return 2
        redis, redis_url = start_redis(Path(tempfile.gettempdir()) / "path-redis.log", False)
    try:
        result = uvloop.run(measure(args, redis, redis_url))
    finally:
        if redis is not None:
            redis.stop()
    if args.quiet:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"path-{args.engine}.json").write_bytes(orjson.dumps(result))
    runs = ", ".join(f"{r:.2f}" for r in result["cpu_us_per_message"])
    print(
        f"{result['engine']} engine, {args.channels:,} channels x 1 subscriber, "
        f"{_BATCH}-item batches: {result['best']:.2f} CPU us per message, best of {runs}"
    )
    for generation, pauses in result["collections"].items():
        print(
            f"collections of generation {generation} during the runs: {pauses['count']:.0f}, "
            f"mean {pauses['mean_ms']:.1f} ms, longest {pauses['max_ms']:.1f} ms"
        )
    print(
        f"then a full garbage collection: {result['full_collection_ms']:.1f} ms, "
        f"{result['tracked_objects']:,} objects tracked (set-up objects frozen)"
    )
    if result["redis_cpu_us_per_message"] is not None:
        print(f"redis-server: {result['redis_cpu_us_per_message']:.2f} CPU us per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
