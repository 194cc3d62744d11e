"""Fan-out benchmark: one publisher, N WebSocket subscribers of one channel, memory engine.

Starts ``python -m herald serve`` pinned to CPU 0, runs the load generator in
this process pinned to CPU 1, and reports for each step: publishes per
second, deliveries per second (frames received across all subscribers),
loss, the CPU both sides used, and publish->receive latency p50/p99.
See bench/README.md for how to read the table.

Usage: python bench/fanout.py [--subscribers 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/fanout.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.httpload import request_sync
from bench.loadgen import (
    PAYLOAD_BYTES,
    Publisher,
    Role,
    Totals,
    WsClient,
    WsFeeder,
    open_client,
)
from bench.procs import (
    HOST,
    LOADGEN_CPU,
    RESULTS,
    SERVER_CPU,
    Proc,
    can_pin,
    free_port,
    machine_busy_seconds,
    machine_facts,
    placement,
    raise_nofile,
    server_facts,
    start_herald,
    start_redis,
)

DRAIN_SECONDS = 2.0
"""How long a step's last deliveries may take; what arrives later counts as lost."""
SETTLE_SECONDS = 30.0
"""How long to wait for stragglers before the next step, so steps do not overlap."""
WARMUP_SECONDS = 1.0
SAMPLES_PER_SECOND = 200
"""Target timestamped publishes per second in paced steps (each probe decodes those)."""
MAX_STEP_SAMPLE_EVERY = 50
"""In the as-fast-as-possible step, every 50th publish carries a timestamp."""


# The server process


@dataclass
class Server:
    """A ``herald serve`` subprocess."""

    proc: Proc
    port: int
    key: str
    pinned: bool

    @property
    def url(self) -> str:
        """Base HTTP URL."""
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where its output goes."""
        return self.proc.log_path

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (/proc/<pid>/stat)."""
        return self.proc.cpu_seconds()

    def rss_kib(self) -> int:
        """Resident memory of the server, KiB."""
        return self.proc.rss_kib()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it lingers; the exit code."""
        return self.proc.stop()


def start_server(
    port: int, key: str, log_path: Path, pin: bool, redis_url: str | None = None
) -> Server:
    """Start the server (Redis engine if ``redis_url``), pinned to CPU 0 when ``pin``."""
    return Server(start_herald(port, key, log_path, pin, redis_url), port, key, pin)


def wait_healthy(server: Server, timeout: float = 20.0) -> None:
    """Poll /healthz until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        if not server.proc.alive():
            raise RuntimeError(
                f"herald exited with {server.proc.popen.returncode}; see {server.log_path}"
            )
        with contextlib.suppress(OSError):
            if request_sync(server.port, "GET", "/healthz", timeout=1)[0] == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"herald did not become healthy; see {server.log_path}")
        time.sleep(0.05)


def create_channel(server: Server, name: str) -> None:
    """POST /v1/channels with the admin key."""
    status, body = request_sync(
        server.port, "POST", "/v1/channels", server.key, orjson.dumps({"name": name})
    )
    if status != 201:
        raise RuntimeError(f"creating the channel: {status} {body.decode(errors='replace')}")


# Measuring


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def measure_step(
    publisher: Publisher,
    totals: Totals,
    server: Server,
    *,
    label: str,
    seconds: float,
    rate: float | None,
    subscribers: int,
) -> dict[str, Any]:
    """One publishing window, then a drain of up to two seconds; everything about it."""
    loop = asyncio.get_running_loop()
    sample_every = (
        MAX_STEP_SAMPLE_EVERY if rate is None else max(1, round(rate / SAMPLES_PER_SECOND))
    )
    totals.samples = []
    totals.sampling = True
    closes_before = sum(totals.closes.values())
    reads_before = totals.reads
    errors_before = totals.error_count
    machine_cpu = machine_busy_seconds()
    server_cpu = server.cpu_seconds()
    loadgen_cpu = time.process_time()
    counts = await publisher.run(seconds, rate, sample_every)
    server_cpu = server.cpu_seconds() - server_cpu
    loadgen_cpu = time.process_time() - loadgen_cpu
    other_cpu = max(0.0, machine_busy_seconds() - machine_cpu - server_cpu - loadgen_cpu)
    reads = totals.reads - reads_before

    expected = counts.published * subscribers
    drain_start = loop.time()
    await publisher.wait_until(counts.first_received + expected, totals.sent, DRAIN_SECONDS)
    drain = loop.time() - drain_start
    totals.sampling = False
    received = totals.received - counts.first_received
    lost = expected - received
    if lost > 0:
        await publisher.wait_until(counts.first_received + expected, totals.sent, SETTLE_SECONDS)
    late = totals.received - counts.first_received - received
    samples = sorted(totals.samples)
    elapsed = counts.seconds
    return {
        "step": label,
        "target_publishes_per_s": rate,
        "seconds": round(elapsed, 3),
        "published": counts.published,
        "publishes_per_s": counts.published / elapsed,
        "delivered_in_window": counts.delivered,
        "deliveries_per_s": counts.delivered / elapsed,
        "expected_deliveries": expected,
        "received_after_drain": received,
        "lost": lost,
        "loss_pct": 100.0 * lost / expected if expected else 0.0,
        "drain_seconds": round(drain, 3),
        "late_deliveries": late,
        "subscriber_reads_per_s": reads / elapsed,
        "deliveries_per_read": counts.delivered / reads if reads else None,
        "unacknowledged_publishes": totals.sent - totals.acked,
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": 100.0 * server_cpu / elapsed,
        "server_us_per_delivery": 1e6 * server_cpu / counts.delivered if counts.delivered else None,
        "loadgen_cpu_s": round(loadgen_cpu, 3),
        "loadgen_cpu_pct": 100.0 * loadgen_cpu / elapsed,
        "other_cpu_s": round(other_cpu, 3),
        "other_cpu_pct": 100.0 * other_cpu / elapsed,
        "latency": {
            "sample_every": sample_every,
            "samples": len(samples),
            "p50_ms": percentile(samples, 0.50) / 1e6 if samples else None,
            "p99_ms": percentile(samples, 0.99) / 1e6 if samples else None,
            "max_ms": samples[-1] / 1e6 if samples else None,
        },
        "subscriber_closes": sum(totals.closes.values()) - closes_before,
        "client_errors": totals.error_count - errors_before,
    }


async def run_benchmark(args: argparse.Namespace, server: Server, channel: str) -> dict[str, Any]:
    """Connect everyone, warm up, then one as-fast-as-allowed step and the paced steps."""
    totals = Totals()
    n = args.subscribers
    key = server.key
    rss_before = server.rss_kib()

    # Subscribe the probes first, in the middle and last: they sit at the start,
    # middle and end of the hub's fan-out walk.
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(args.concurrency)
    middle = n // 2

    async def subscriber(index: int) -> WsClient:
        async with semaphore:
            role: Role = "probe" if index == middle else "subscriber"
            return await open_client(totals, server.port, role, channel, key)

    clients = [await open_client(totals, server.port, "probe", channel, key)]
    failures: list[str] = []
    if n > 2:
        results = await asyncio.gather(
            *(subscriber(i) for i in range(1, n - 1)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                failures.append(repr(result))
            else:
                clients.append(result)
    if n > 1:
        clients.append(await open_client(totals, server.port, "probe", channel, key))
    connect_seconds = time.perf_counter() - started
    subscribed = len(clients)
    await asyncio.sleep(0.5)
    rss_after = server.rss_kib()

    publisher_client = await open_client(totals, server.port, "publisher", channel, key)
    publisher = Publisher(
        WsFeeder(publisher_client, [channel]),
        totals,
        subscribed,
        window=args.window,
        backlog=args.backlog,
    )
    warmup = await measure_step(
        publisher,
        totals,
        server,
        label="warm-up",
        seconds=WARMUP_SECONDS,
        rate=None,
        subscribers=subscribed,
    )

    steps = [
        await measure_step(
            publisher,
            totals,
            server,
            label="max",
            seconds=args.seconds,
            rate=None,
            subscribers=subscribed,
        )
    ]
    max_rate = steps[0]["publishes_per_s"]
    paced = [(f"{rate:g}/s", rate) for rate in args.rates] or [
        (f"{fraction:.0%} of max", fraction * max_rate) for fraction in args.fractions
    ]
    for label, rate in paced:
        steps.append(
            await measure_step(
                publisher,
                totals,
                server,
                label=label,
                seconds=args.seconds,
                rate=rate,
                subscribers=subscribed,
            )
        )
    still_open = totals.subscribers_open
    for client in [*clients, publisher_client]:
        client.close()
    await asyncio.sleep(0.1)
    return {
        "setup": {
            "subscribers_requested": n,
            "subscribers": subscribed,
            "connect_failures": len(failures),
            "connect_failure_examples": failures[:5],
            "connect_seconds": round(connect_seconds, 3),
            "connections_per_s": subscribed / connect_seconds if connect_seconds else None,
            "first_message_checked": totals.checked,
            "server_rss_kib_before": rss_before,
            "server_rss_kib_after": rss_after,
            "server_kib_per_idle_subscriber": (rss_after - rss_before) / subscribed
            if subscribed
            else None,
        },
        "warmup": warmup,
        "steps": steps,
        "subscribers_open_at_end": still_open,
        "subscriber_closes": dict(totals.closes),
        "client_errors": totals.error_count,
        "client_error_examples": list(totals.errors),
    }


# Reporting


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(subscribers: int, steps: list[dict[str, Any]]) -> str:
    """The result table, rows by increasing publish rate."""
    columns = (
        ("subscribers", 11),
        ("step", 10),
        ("publishes/s", 11),
        ("deliveries/s", 12),
        ("loss %", 7),
        ("server CPU %", 12),
        ("loadgen CPU %", 13),
        ("p50 ms", 7),
        ("p99 ms", 7),
        ("other CPU %", 11),
    )
    lines = ["  ".join(name.rjust(width) for name, width in columns)]
    for step in sorted(steps, key=lambda s: s["publishes_per_s"]):
        cells = (
            str(subscribers),
            step["step"],
            f"{step['publishes_per_s']:.0f}",
            f"{step['deliveries_per_s']:.0f}",
            f"{step['loss_pct']:.2f}",
            f"{step['server_cpu_pct']:.0f}",
            f"{step['loadgen_cpu_pct']:.0f}",
            _ms(step["latency"]["p50_ms"]),
            _ms(step["latency"]["p99_ms"]),
            f"{step['other_cpu_pct']:.0f}",
        )
        lines.append(
            "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, columns, strict=True))
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=1000, help="subscriber connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each step")
    parser.add_argument(
        "--fractions",
        type=lambda text: [float(x) for x in text.split(",") if x.strip()],
        default=[0.25, 0.5, 0.75],
        help="paced steps, as fractions of the max step's publish rate (default 0.25,0.5,0.75)",
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",") if x.strip()],
        default=[],
        help="paced steps at these publish rates per second instead of --fractions",
    )
    parser.add_argument(
        "--window", type=int, default=1024, help="most publishes in flight without an answer"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=256,
        help="most undelivered messages per subscriber (on average) before the publisher waits",
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="subscriber connections opened at once"
    )
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument(
        "--engine",
        choices=["memory", "redis", "both"],
        default="memory",
        help="which engine to run (redis: a throwaway redis-server on the server's CPU)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "fanout.json", help="where to write the JSON"
    )
    args = parser.parse_args(argv)
    if args.subscribers < 1 or args.seconds <= 0 or args.window < 1 or args.backlog < 1:
        parser.error("--subscribers, --seconds, --window and --backlog must be positive")
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    if any(r <= 0 for r in args.rates):
        parser.error("--rates must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each engine asked for; print the tables and write the JSON."""
    args = parse_args(argv)
    nofile = raise_nofile(args.subscribers + 256)
    if nofile[0] < args.subscribers + 64:
        print(f"open-files limit {nofile[0]} is too low for {args.subscribers} subscribers")
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    engines = ["memory", "redis"] if args.engine == "both" else [args.engine]
    # Decided once: after the first run this process is pinned to the load generator's CPU.
    pin = can_pin()
    maxima: dict[str, float] = {}
    for engine in engines:
        output = args.output
        if len(engines) > 1:
            output = output.with_name(f"{output.stem}-{engine}{output.suffix}")
        maxima[engine] = run_engine(args, engine, nofile, output, pin)
    if len(maxima) == 2 and maxima["memory"]:
        print(
            f"redis / memory, max deliveries/s: {maxima['redis']:.0f} / {maxima['memory']:.0f}"
            f" = {maxima['redis'] / maxima['memory']:.2f}"
        )
    return 0


def run_engine(
    args: argparse.Namespace, engine: str, nofile: tuple[int, int], output: Path, pin: bool
) -> float:
    """One engine's run: start Redis if needed and the server, measure, report; max rate."""
    key = "bench-" + secrets.token_urlsafe(24)
    channel = f"bench-{secrets.token_hex(4)}"
    load_before = os.getloadavg()
    redis_proc, redis_url = (
        start_redis(RESULTS / "fanout-redis.log", pin) if engine == "redis" else (None, None)
    )
    server = start_server(
        args.port or free_port(), key, RESULTS / f"fanout-server-{engine}.log", pin, redis_url
    )
    try:
        if pin:
            os.sched_setaffinity(0, {LOADGEN_CPU})
        wait_healthy(server)
        create_channel(server, channel)
        outcome = uvloop.run(run_benchmark(args, server, channel))
    finally:
        exit_code = server.stop()
        if redis_proc is not None:
            redis_proc.stop()
    load_after = os.getloadavg()

    facts = server_facts(server.proc, exit_code)
    report = {
        "benchmark": "fanout",
        "engine": engine,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(load_before, load_after),
        "config": {
            "subscribers": args.subscribers,
            "seconds_per_step": args.seconds,
            "fractions": args.fractions,
            "rates": args.rates,
            "publisher": "websocket herald.json publish frames (one connection)",
            "payload_bytes": PAYLOAD_BYTES,
            "window": args.window,
            "backlog_per_subscriber": args.backlog,
            "server_cpu": SERVER_CPU if pin else None,
            "loadgen_cpu": LOADGEN_CPU if pin else None,
            "open_files_limit": nofile[0],
        },
        **outcome,
        "server": facts,
    }
    output.write_bytes(_json(report))

    setup = outcome["setup"]
    print(
        f"Herald fan-out, {engine} engine: {setup['subscribers']} subscribers "
        f"(connected in {setup['connect_seconds']:.1f} s), {args.seconds:g} s per step, "
        f"{PAYLOAD_BYTES}-byte payloads, WebSocket publisher; {placement(pin)}"
    )
    print(table(setup["subscribers"], outcome["steps"]))
    notes = []
    if setup["connect_failures"]:
        notes.append(f"{setup['connect_failures']} subscribers failed to connect")
    if setup["first_message_checked"] != setup["subscribers"]:
        notes.append(
            f"first message checked on {setup['first_message_checked']} of "
            f"{setup['subscribers']} subscribers"
        )
    late = sum(step["late_deliveries"] for step in outcome["steps"])
    if late:
        notes.append(
            f"{late} deliveries came after the {DRAIN_SECONDS:g} s drain (counted as loss): "
            "the server was still writing a backlog, see drain_seconds in the JSON"
        )
    if outcome["subscriber_closes"]:
        notes.append(f"subscriber connections closed by the server: {outcome['subscriber_closes']}")
    if outcome["client_errors"]:
        notes.append(
            f"{outcome['client_errors']} client errors, e.g. {outcome['client_error_examples'][:3]}"
        )
    busiest = max(outcome["steps"], key=lambda step: step["other_cpu_pct"])
    if busiest["other_cpu_pct"] > 10:
        notes.append(
            f"other processes used up to {busiest['other_cpu_pct']:.0f}% of a CPU during the "
            "steps: the numbers are disturbed"
        )
    if facts["log_problems"]:
        notes.append(f"{facts['log_problems']} warning/error lines in {server.log_path}")
    for note in notes:
        print(f"note: {note}")
    print(f"JSON: {output}")
    return max(float(step["deliveries_per_s"]) for step in outcome["steps"])


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"


if __name__ == "__main__":
    raise SystemExit(main())
