"""How long a Herald worker holding many idle connections stops its loop.

A worker with 10,000 connections and nothing to deliver should still answer
at once; whatever it does for all of its connections in one go (pinging
them, reporting them) shows up as a stop. This starts Herald (memory engine,
one worker, pinned like `bench/run.py` does), opens ``--connections`` idle
WebSocket clients with the load generator, then has one probe client send a
``ping`` op every 2 ms for ``--seconds`` and reports the round trips: a
stop of the worker is a round trip as long as the stop.

    .venv/bin/python bench/stalls.py                       # 10,000 connections, 21 s
    .venv/bin/python bench/stalls.py --ping-interval 10    # HERALD_PING_INTERVAL

``--ping-interval`` is set low by default (10 s), so the probe sees a couple
of keepalive rounds; the server's default is 25 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import orjson
import uvloop
import websockets

if __package__ in (None, ""):
    # Run as a script (python bench/stalls.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import Totals, WsClient, open_client
from bench.procs import (
    LOADGEN_CPU,
    RESULTS,
    can_pin,
    free_port,
    raise_nofile,
    start_herald,
    wait_port,
)

_KEY = "bench-stalls-admin-key-0123456789abcdef"


async def measure(args: argparse.Namespace) -> dict[str, float | int]:
    """Start Herald, open the idle connections, probe; the round trips' figures (ms)."""
    pin = can_pin()
    if pin:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    port = free_port()
    settings = {"HERALD_PING_INTERVAL": str(args.ping_interval)}
    RESULTS.mkdir(exist_ok=True)
    server = start_herald(port, _KEY, RESULTS / "stalls-server.log", pin, settings=settings)
    clients: list[WsClient] = []
    try:
        await asyncio.to_thread(wait_port, server, port, 30.0)
        totals = Totals()
        turns = asyncio.Semaphore(100)

        async def one() -> WsClient:
            async with turns:
                return await open_client(totals, port, "publisher", "", _KEY, 30.0)

        clients = list(await asyncio.gather(*(one() for _ in range(args.connections))))
        url = f"ws://127.0.0.1:{port}/v1/connect"
        async with websockets.connect(url, subprotocols=["herald.json"]) as probe:  # type: ignore[list-item]
            await probe.send(orjson.dumps({"op": "connect", "id": 0, "key": _KEY}).decode())
            await probe.recv()
            trips: list[float] = []
            end = time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                sent = time.perf_counter()
                await probe.send(orjson.dumps({"op": "ping", "id": len(trips)}).decode())
                await probe.recv()
                trips.append((time.perf_counter() - sent) * 1000)
                await asyncio.sleep(0.002)
    finally:
        for client in clients:
            client.close()
        server.stop()
    trips.sort()
    return {
        "connections": args.connections,
        "ping_interval_s": args.ping_interval,
        "probes": len(trips),
        "p50_ms": trips[len(trips) // 2],
        "p99_ms": trips[int(len(trips) * 0.99)],
        "p999_ms": trips[int(len(trips) * 0.999)],
        "max_ms": trips[-1],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, measure, print one line (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=21.0, help="how long the probe runs")
    parser.add_argument("--ping-interval", type=float, default=10.0, help="HERALD_PING_INTERVAL")
    args = parser.parse_args(argv)
    raise_nofile()
    result = uvloop.run(measure(args))
    (RESULTS / "stalls.json").write_bytes(orjson.dumps(result))
    print(
        f"{result['connections']:,} idle connections, ping interval {args.ping_interval:g} s: "
        f"{result['probes']:,} probe round trips, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, p99.9 {result['p999_ms']:.2f} ms, "
        f"longest {result['max_ms']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
