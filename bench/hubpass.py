"""What the hub itself adds to a flush pass over many connections.

A fan-out to N connections ends in a pass that writes each of them once,
cut into slices of about 5 ms so that the worker's loop can read sockets in
between (`herald.hub`). The writes are the kernel's; this measures what the
hub spends around them: N stand-in subscribers whose flush takes
``--write-us`` of busy CPU (a write to a socket costs some 10 µs), scheduled
all at once, then the loop run until the last one was flushed. The pass's
time minus the flushes' own is the hub's share.

    .venv/bin/python bench/hubpass.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/hubpass.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herald.hub import Hub
from herald.models import Device
from herald.protocol import Encoding


class BusySubscriber:
    """A connection whose write takes a fixed time of CPU."""

    encoding = Encoding.JSON
    device: Device | None = None

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.flushed: asyncio.Event | None = None

    def push(self, frame: bytes) -> None:
        """Nothing is queued: only flushes are measured."""

    def flush(self) -> None:
        """Spin for the time a write takes."""
        if self.flushed is not None:
            self.flushed.set()
        until = time.perf_counter() + self.seconds
        while time.perf_counter() < until:
            pass


async def measure(connections: int, write_us: float, repeats: int) -> tuple[float, float]:
    """The best pass over ``connections`` and the flushes' own time, both in seconds."""
    hub = Hub()
    subscribers = [BusySubscriber(write_us / 1e6) for _ in range(connections)]
    last = subscribers[-1]
    last.flushed = asyncio.Event()
    best = float("inf")
    for _ in range(repeats):
        last.flushed.clear()
        for subscriber in subscribers:
            hub.schedule_flush(subscriber)
        start = time.perf_counter()
        await last.flushed.wait()
        best = min(best, time.perf_counter() - start)
    sample = subscribers[: min(connections, 2000)]
    start = time.perf_counter()
    for subscriber in sample:
        subscriber.flush()
    flushes = (time.perf_counter() - start) / len(sample) * connections
    return best, flushes


def main(argv: list[str] | None = None) -> int:
    """Measure and print one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--write-us", type=float, default=10.0, help="CPU µs of one write")
    parser.add_argument("--repeats", type=int, default=7, help="passes; the best is reported")
    args = parser.parse_args(argv)
    best, flushes = uvloop.run(measure(args.connections, args.write_us, args.repeats))
    print(
        f"{args.connections:,} connections, {args.write_us:g} µs a write: pass {best * 1e3:.2f} ms,"
        f" writes alone {flushes * 1e3:.2f} ms, the hub's share {(best - flushes) * 1e3:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
