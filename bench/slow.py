"""Slow consumers among 1,000 bystanders: cut with 4008, the bystanders unaffected.

Starts a one-worker Herald on the memory engine (with a lowered outbox limit),
subscribes ``--bystanders`` readers and ``--slow`` clients with a small
receive buffer to one channel, and publishes ``--payload-bytes`` messages at
a fixed ``--rate``. After a warm-up, a baseline phase; then the slow clients
stop reading until the server closes them (4008), and the run goes on for as
long again. Every bystander decodes every message: the publish time and
number in its payload give the latency and any loss, duplicate or reordering.
One table: per phase, bystander latency and deliveries/s, the cuts, losses
and the server's resident memory. Exit status 1 when a bystander lost,
duplicated or reordered a message or was closed, or a slow client was not
closed with 4008.

Usage: python bench/slow.py [--bystanders 1000] [--slow 5] [--rate 50] [--payload-bytes 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import secrets
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/slow.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.faults import Link, open_link, progress
from bench.httpload import fetch
from bench.loadgen import Publisher, Totals, WsFeeder, open_client
from bench.procs import (
    LOADGEN_CPU,
    RESULTS,
    SERVER_CPU,
    Proc,
    can_pin,
    free_port,
    machine_busy_seconds,
    machine_facts,
    machine_irq_seconds,
    placement,
    raise_nofile,
    server_facts,
    start_herald,
    wait_port,
)
from bench.scenarios import percentile
from bench.targets import Mark, loadavg, usage

SLOW_CONSUMER = "4008"
_STAMP = b'"payload":"T'
_CUT_MARK = ": slow consumer ("
WARMUP, BASELINE, STALLED, AFTER_CUT = range(4)
"""Phases, by the publish number's phase (latency, losses) or the receive time (rates)."""
RSS_EVERY = 0.05
CUT_POLL = 0.02


# What the bystanders saw -----------------------------------------------------------------


@dataclass
class Ledger:
    """Every message published and what the bystanders made of it (one event loop)."""

    phase: int = WARMUP
    """The phase new publishes belong to."""
    phase_of: list[int] = field(default_factory=list)
    """Publish number -> the phase it was published in."""
    deliveries: list[int] = field(default_factory=list)
    """Publish number -> bystanders that received it."""
    latencies: list[array[int]] = field(default_factory=list)
    """Publish number -> its publish->receive latencies (ns), one per bystander."""
    disorder: int = 0
    """Frames that did not carry the number after the bystander's previous one."""
    closes: dict[str, int] = field(default_factory=dict)
    """How bystander connections ended during the run (close code, eof, reset) -> count."""
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        """Keep the first few unexpected things a client saw."""
        if len(self.errors) < 20:
            self.errors.append(text)

    def payload_maker(self, size: int) -> Callable[[int], bytes]:
        """``WsFeeder`` payloads of ``size`` bytes: ``T<time_ns>.<number>.`` and padding."""
        padding = b"p" * size

        def make(number: int) -> bytes:
            # Numbers come in order from 0: the ledger's lists are indexed by them.
            self.phase_of.append(self.phase)
            self.deliveries.append(0)
            self.latencies.append(array("q"))
            head = b"T%d.%d." % (time.time_ns(), number)
            return head + padding[len(head) :]

        return make


class Subscriber:
    """One connection subscribed to the channel: a bystander or a slow client.

    A bystander checks every message's number against the previous one and
    records its latency; a slow client only counts frames (it has a small
    receive buffer and stops reading on `stall`).
    """

    def __init__(self, ledger: Ledger, totals: Totals, bystander: bool) -> None:
        self.ledger = ledger
        self.totals = totals
        self.bystander = bystander
        self.link: Link | None = None
        self.client_id = ""
        self.frames = 0
        self.last = -1
        self.ended = ""
        """Why the connection ended: close code, ``eof`` or ``reset``; empty while open."""
        self.stopping = False
        self._subscribed: asyncio.Future[None] | None = None

    async def open(self, port: int, key: str, channel: str, rcvbuf: int = 0, mss: int = 0) -> None:
        """Connect, subscribe, and wait for ``subscribed`` (`open_link` for the sizes)."""
        self._subscribed = asyncio.get_running_loop().create_future()
        self.link = await open_link(port, self._on_frame, self._on_lost, rcvbuf, mss)
        self.link.send(
            {"op": "connect", "id": 1, "key": key},
            {"op": "subscribe", "id": 2, "channel": channel},
        )
        try:
            async with asyncio.timeout(15):
                await self._subscribed
        except BaseException:
            self.link.abort()
            raise

    def _on_frame(self, opcode: int, payload: bytes) -> None:
        subscribed = self._subscribed
        if subscribed is not None and not subscribed.done():
            frame = orjson.loads(payload)
            if frame.get("op") == "connected":
                self.client_id = frame["client_id"]
            elif frame.get("op") == "subscribed":
                subscribed.set_result(None)
            else:
                subscribed.set_exception(ConnectionError(f"answered {payload[:200]!r}"))
            return
        self.frames += 1
        if not self.bystander:
            return
        now = time.time_ns()
        # Only the stamp is decoded: a full JSON parse of every frame of a thousand
        # readers would make the load generator, not the server, the slow side.
        start = payload.find(_STAMP, 0, 512) + len(_STAMP)
        dot = payload.find(b".", start)
        end = payload.find(b".", dot + 1)
        if start < len(_STAMP) or dot < 0 or end < 0:
            self.ledger.error(f"unexpected frame {payload[:200]!r}")
            return
        number = int(payload[dot + 1 : end])
        ledger = self.ledger
        if number != self.last + 1:
            ledger.disorder += 1
        self.last = max(self.last, number)
        ledger.deliveries[number] += 1
        ledger.latencies[number].append(now - int(payload[start:dot]))
        totals = self.totals
        totals.received += 1
        if totals.on_progress is not None:
            totals.poke()

    def _on_lost(self, reason: str) -> None:
        subscribed = self._subscribed
        if subscribed is not None and not subscribed.done():
            subscribed.set_exception(ConnectionError(f"lost before subscribed ({reason})"))
        self.ended = reason
        if self.bystander and not self.stopping:
            self.ledger.closes[reason] = self.ledger.closes.get(reason, 0) + 1

    def stall(self) -> None:
        """Stop reading: the kernel buffers fill, then the server's outbox grows."""
        if self.link is not None and self.link.transport is not None:
            self.link.transport.pause_reading()

    def resume(self) -> None:
        """Read again (to drain what is in flight and find the close frame)."""
        transport = self.link.transport if self.link is not None else None
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def stop(self) -> None:
        """Drop the connection (the run is over)."""
        self.stopping = True
        if self.link is not None:
            self.link.abort()


# The server's side ------------------------------------------------------------------------


@dataclass
class Cut:
    """A ``closing <client>: slow consumer (N bytes unsent)`` line of the server's log."""

    client_id: str
    at: float
    """When the server logged it (``time.time()`` clock, millisecond resolution)."""
    unsent: int


class LogWatch:
    """Reads the lines the server appends to its log and picks out the 4008 closes."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._file.seek(0, os.SEEK_END)
        self._partial = b""

    def poll(self) -> list[Cut]:
        """The cuts logged since the last poll."""
        data = self._partial + self._file.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        found = []
        for raw in lines:
            line = raw.decode(errors="replace")
            if _CUT_MARK not in line:
                continue
            # "2026-11-22 06:44:17,391 INFO herald.transport: closing ID: slow consumer (N ..."
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            head, _, tail = line.partition(_CUT_MARK)
            cut = Cut(
                client_id=head.rsplit("closing ", 1)[1],
                at=stamp + int(line[20:23]) / 1000,
                unsent=int(tail.split()[0]),
            )
            found.append(cut)
        return found

    def close(self) -> None:
        """Close the file."""
        self._file.close()


@dataclass
class Edge:
    """The counters at one phase boundary."""

    mark: Mark
    irq: float
    """`machine_irq_seconds` so far."""
    received: int
    rss_kib: int


@dataclass
class Run:
    """The server, the clients and what was recorded of one run."""

    args: argparse.Namespace
    server: Proc
    port: int
    key: str
    pids: list[int]
    ledger: Ledger = field(default_factory=Ledger)
    totals: Totals = field(default_factory=Totals)
    rss: list[tuple[float, int]] = field(default_factory=list)
    """(perf_counter, server RSS KiB) every `RSS_EVERY` seconds."""

    def edge(self) -> Edge:
        """Snapshot at a phase boundary."""
        mark = Mark(
            wall=time.perf_counter(),
            server=self.server.cpu_seconds(),
            redis=0.0,
            loadgen=time.process_time(),
            machine=machine_busy_seconds(),
        )
        rss = self.server.rss_kib(self.pids)
        self.rss.append((mark.wall, rss))
        return Edge(mark, machine_irq_seconds(), self.totals.received, rss)


async def sample_rss(run: Run, until: Callable[[], bool]) -> None:
    """Record the server's RSS until ``until()``: the peaks between the edges."""
    while not until():
        run.rss.append((time.perf_counter(), run.server.rss_kib(run.pids)))
        await asyncio.sleep(RSS_EVERY)


async def await_cuts(
    watch: LogWatch, slow: list[Subscriber], within: float
) -> tuple[dict[str, Cut], list[Cut]]:
    """Until every slow client is cut (or ``within`` seconds): their cuts, and any other's.

    A slow client reads again as soon as its cut is logged, so it drains what
    was in flight and finds the close frame before the server drops the link.
    """
    by_id = {s.client_id: s for s in slow}
    mine: dict[str, Cut] = {}
    others: list[Cut] = []
    deadline = time.monotonic() + within
    while len(mine) < len(slow) and time.monotonic() < deadline:
        await asyncio.sleep(CUT_POLL)
        for cut in watch.poll():
            if cut.client_id in by_id:
                mine[cut.client_id] = cut
                by_id[cut.client_id].resume()
            else:
                others.append(cut)
    return mine, others


# The run ----------------------------------------------------------------------------------


async def exercise(run: Run) -> dict[str, Any]:
    """Connect, publish through the phases, drain, and summarise each phase."""
    args, ledger, totals = run.args, run.ledger, run.totals
    channel = f"slow-{secrets.token_hex(4)}"
    status, body = await fetch(
        run.port, "POST", "/v1/channels", run.key, orjson.dumps({"name": channel})
    )
    if status != 201:
        raise RuntimeError(f"creating {channel}: {status} {body[:200]!r}")
    bystanders = [Subscriber(ledger, totals, True) for _ in range(args.bystanders)]
    slow = [Subscriber(ledger, totals, False) for _ in range(args.slow)]
    gate = asyncio.Semaphore(args.concurrency)

    async def open_one(subscriber: Subscriber) -> None:
        async with gate:
            if subscriber.bystander:
                await subscriber.open(run.port, run.key, channel)
            else:
                await subscriber.open(run.port, run.key, channel, args.rcvbuf, args.slow_mss)

    progress(f"connecting {args.bystanders} bystanders and {args.slow} slow clients")
    started = time.perf_counter()
    await asyncio.gather(*(open_one(s) for s in [*bystanders, *slow]))
    connect_seconds = time.perf_counter() - started
    publisher_client = await open_client(totals, run.port, "publisher", channel, run.key)
    feeder = WsFeeder(publisher_client, [channel], ledger.payload_maker(args.payload_bytes))
    # The bounds are a safety net only: at this rate they never bind unless the
    # load generator falls seconds behind, and then it shows as a lower rate.
    publisher = Publisher(
        feeder,
        totals,
        args.bystanders,
        window=1024,
        backlog=max(16, int(args.rate * 5)),
    )
    watch = LogWatch(run.server.log_path)
    done = False
    sampler = asyncio.create_task(sample_rss(run, lambda: done))
    # One paced run spans every phase, so no phase starts with a ramp or a gap.
    budget = args.warmup + 2 * args.seconds + args.cut_within
    publishing = asyncio.create_task(publisher.run(budget, args.rate, 1))
    progress(f"publishing {args.rate:g}/s of {args.payload_bytes} bytes; warm-up")
    try:
        await asyncio.sleep(args.warmup)
        ledger.phase = BASELINE
        edges = [run.edge()]
        progress(f"baseline for {args.seconds:g} s")
        await asyncio.sleep(args.seconds)
        ledger.phase = STALLED
        edges.append(run.edge())
        stopped_at = time.time()
        for subscriber in slow:
            subscriber.stall()
        progress(f"{args.slow} slow clients stop reading")
        cuts, other_cuts = await await_cuts(watch, slow, args.cut_within)
        ledger.phase = AFTER_CUT
        edges.append(run.edge())
        progress(f"{len(cuts)} of {args.slow} cut; {args.seconds:g} s more")
        await asyncio.sleep(args.seconds)
        edges.append(run.edge())
    finally:
        publishing.cancel()
        await asyncio.wait([publishing])
        done = True
    progress("publishing stopped; draining")
    published = totals.sent
    await publisher.wait_until(published * args.bystanders, published, 10.0)
    await asyncio.sleep(0.5)  # anything extra (a duplicate) arrives now
    await sampler
    other_cuts += watch.poll()
    watch.close()
    for subscriber in [*bystanders, *slow]:
        subscriber.stop()
    publisher_client.close()

    phases = [
        ("(a) baseline", [BASELINE], edges[0], edges[1]),
        (f"(b) {args.slow} slow stop reading", [STALLED, AFTER_CUT], edges[1], edges[3]),
        ("    until the last cut", [STALLED], edges[1], edges[2]),
        ("    after the last cut", [AFTER_CUT], edges[2], edges[3]),
    ]
    rows = [summarise(run, label, kinds, start, end) for label, kinds, start, end in phases]
    closed_4008 = sum(1 for s in slow if s.ended.startswith(SLOW_CONSUMER))
    after = sorted(cut.at - stopped_at for cut in cuts.values())
    for row in rows[1:3]:
        row["slow_closed_4008"] = closed_4008
        row["cut_after_s"] = [after[0], after[-1]] if after else None
    warm = [n for n, phase in enumerate(ledger.phase_of) if phase == WARMUP]
    return {
        "setup": {"connect_seconds": round(connect_seconds, 3), "channel": channel},
        "rows": rows,
        "published": published,
        "warmup_lost": sum(max(0, args.bystanders - ledger.deliveries[n]) for n in warm),
        "disorder": ledger.disorder,
        "bystander_closes": dict(ledger.closes),
        "bystanders_cut": len(other_cuts),
        "slow": [
            {
                "client_id": s.client_id,
                "frames_read": s.frames,
                "ended": s.ended,
                "cut_after_s": (cuts[s.client_id].at - stopped_at) if s.client_id in cuts else None,
                "unsent_bytes_at_cut": cuts[s.client_id].unsent if s.client_id in cuts else None,
            }
            for s in slow
        ],
        "client_errors": ledger.errors + totals.errors,
    }


def summarise(run: Run, label: str, phases: list[int], start: Edge, end: Edge) -> dict[str, Any]:
    """One row: latency and losses of the messages published in ``phases``, rates, CPU
    and memory between the two edges."""
    ledger, bystanders = run.ledger, run.args.bystanders
    wanted = set(phases)
    numbers = [n for n, phase in enumerate(ledger.phase_of) if phase in wanted]
    counts = [ledger.deliveries[n] for n in numbers]
    samples = sorted(value for n in numbers for value in ledger.latencies[n])
    # The p99 of each second's worth of messages: how far p99 wanders on its own.
    per_second = max(1, round(run.args.rate))
    seconds_p99 = [
        percentile(window, 0.99) / 1e6
        for i in range(0, len(numbers) - per_second + 1, per_second)
        if (window := sorted(v for n in numbers[i : i + per_second] for v in ledger.latencies[n]))
    ]
    seconds = end.mark.wall - start.mark.wall
    during = [kib for at, kib in run.rss if start.mark.wall <= at <= end.mark.wall]
    cpu = usage(start.mark, end.mark)
    irq = 100.0 * (end.irq - start.irq) / seconds
    return {
        "phase": label,
        "seconds": round(seconds, 3),
        "published": len(numbers),
        "deliveries_per_s": (end.received - start.received) / seconds,
        "lost": sum(max(0, bystanders - count) for count in counts),
        "duplicates": sum(max(0, count - bystanders) for count in counts),
        "latency_samples": len(samples),
        "p50_ms": percentile(samples, 0.50) / 1e6 if samples else None,
        "p99_ms": percentile(samples, 0.99) / 1e6 if samples else None,
        "max_ms": samples[-1] / 1e6 if samples else None,
        "p99_ms_per_second": seconds_p99,
        "rss_kib": [start.rss_kib, max([start.rss_kib, *during]), end.rss_kib],
        **cpu,
        "irq_cpu_pct": irq,
        # usage() counts interrupt time as other processes'; here it is shown apart.
        "other_cpu_pct": max(0.0, cpu["other_cpu_pct"] - irq),
    }


def table(figures: dict[str, Any]) -> str:
    """The one table this benchmark prints."""
    header = (
        f"{'phase':<25} {'secs':>5} {'4008':>5} {'cut after s':>11} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'p99/s range':>12} {'deliveries/s':>12} {'lost':>4} "
        f"{'dup':>3} {'RSS MiB start/peak/end':>22} {'srv%':>4} {'LG%':>4} {'irq%':>4} "
        f"{'other%':>6}"
    )
    lines = [header, "-" * len(header)]
    slow = len(figures["slow"])
    for row in figures["rows"]:
        closed = f"{row['slow_closed_4008']}/{slow}" if "slow_closed_4008" in row else "-"
        span = row.get("cut_after_s")
        cut = f"{span[0]:.2f}-{span[1]:.2f}" if span else "-"
        per_second = row["p99_ms_per_second"]
        wander = f"{min(per_second):.0f}-{max(per_second):.0f}" if per_second else "-"
        rss = "/".join(f"{kib / 1024:.1f}" for kib in row["rss_kib"])
        lines.append(
            f"{row['phase']:<25} {row['seconds']:>5.1f} {closed:>5} {cut:>11} "
            f"{_cell(row['p50_ms']):>7} {_cell(row['p99_ms']):>7} {_cell(row['max_ms']):>7} "
            f"{wander:>12} {row['deliveries_per_s']:>12,.0f} {row['lost']:>4} "
            f"{row['duplicates']:>3} {rss:>22} {row['server_cpu_pct']:>4.0f} "
            f"{row['loadgen_cpu_pct']:>4.0f} {row['irq_cpu_pct']:>4.0f} "
            f"{row['other_cpu_pct']:>6.0f}"
        )
    return "\n".join(lines)


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bystanders", type=int, default=1000, help="readers (default 1000)")
    parser.add_argument("--slow", type=int, default=5, help="clients that stop reading (5)")
    parser.add_argument("--rate", type=float, default=50.0, help="publishes per second (50)")
    parser.add_argument(
        "--payload-bytes", type=int, default=8192, help="payload of every message (8192)"
    )
    parser.add_argument(
        "--outbox-limit",
        type=int,
        default=256 * 1024,
        help="the server's HERALD_OUTBOX_LIMIT_BYTES (262144; Herald's default is 1 MiB)",
    )
    parser.add_argument(
        "--rcvbuf", type=int, default=16 * 1024, help="SO_RCVBUF of the slow clients (16384)"
    )
    parser.add_argument(
        "--slow-mss",
        type=int,
        default=1460,
        help="TCP MSS the slow clients announce (1460, as over Ethernet; 0: loopback's)",
    )
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="baseline, and the run after the cut (15)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the baseline")
    parser.add_argument(
        "--cut-within", type=float, default=30.0, help="most seconds to wait for the cuts (30)"
    )
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight at once")
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "slow.json", help="where the JSON goes"
    )
    args = parser.parse_args(argv)
    if args.bystanders < 1 or args.slow < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("need --bystanders >= 1, --slow >= 1, --rate > 0 and --seconds > 0")
    if not 64 <= args.payload_bytes <= 60_000:
        parser.error("--payload-bytes must be between 64 and 60000 (Herald's limit is 64 KiB)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run once; print the table; 1 if a bystander suffered or a slow client was not cut."""
    args = parse_args(argv)
    needed = args.bystanders + args.slow + 256
    soft, _ = raise_nofile(needed)
    if soft < needed:
        print(f"open-files limit {soft} is too low for {args.bystanders} bystanders")
        return 2
    pin = can_pin()
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before = loadavg()
    key = "slow-" + secrets.token_urlsafe(24)
    port = free_port()
    settings = {
        "HERALD_OUTBOX_LIMIT_BYTES": str(args.outbox_limit),
        # The cuts are read from the log: its text lines, at info level.
        "HERALD_LOG_FORMAT": "text",
        "HERALD_LOG_LEVEL": "info",
    }
    server = start_herald(port, key, RESULTS / "slow-server.log", pin, settings=settings)
    try:
        wait_port(server, port)
        if pin:
            os.sched_setaffinity(0, {LOADGEN_CPU})
        run = Run(args, server, port, key, server.pids())
        figures = uvloop.run(exercise(run))
    finally:
        exit_code = server.stop()
    load_after = loadavg()
    facts = server_facts(server, exit_code)
    report = {
        "benchmark": "slow",
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(load_before, load_after),
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "engine": "memory",
            "workers": 1,
            "server_cpu": SERVER_CPU if pin else None,
            "loadgen_cpu": LOADGEN_CPU if pin else None,
        },
        **figures,
        "server": facts,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")

    print(
        f"Slow consumers: {args.bystanders} bystanders + {args.slow} slow clients "
        f"(SO_RCVBUF {args.rcvbuf}) on one channel, one worker, memory engine, outbox limit "
        f"{args.outbox_limit} bytes; {args.rate:g} publishes/s of {args.payload_bytes} bytes; "
        f"{placement(pin)}"
    )
    loads = [" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after)]
    print(f"load average before: {loads[0]}   after: {loads[1]}")
    print(table(figures))
    bad = figures["disorder"] + figures["warmup_lost"] + figures["bystanders_cut"]
    bad += sum(row["lost"] + row["duplicates"] for row in figures["rows"])
    bad += sum(figures["bystander_closes"].values())
    unsent = [s["unsent_bytes_at_cut"] for s in figures["slow"] if s["unsent_bytes_at_cut"]]
    notes = []
    if unsent:
        notes.append(f"unsent at the cut: {min(unsent):,}-{max(unsent):,} bytes (server log)")
    if bad:
        notes.append(
            f"BYSTANDERS SUFFERED: out of order {figures['disorder']}, closed "
            f"{figures['bystander_closes']}, cut {figures['bystanders_cut']}"
        )
    not_cut = [s for s in figures["slow"] if not s["ended"].startswith(SLOW_CONSUMER)]
    if not_cut:
        endings = [s["ended"] for s in not_cut]
        notes.append(f"{len(not_cut)} slow clients not closed with 4008: {endings}")
    busiest = max(row["other_cpu_pct"] for row in figures["rows"])
    if busiest > 10:
        notes.append(f"other processes used up to {busiest:.0f}% of a CPU: the run is disturbed")
    notes += figures["client_errors"][:5]
    if facts["log_problems"]:
        notes.append(f"{facts['log_problems']} warning/error lines in {server.log_path}")
    for note in notes:
        print(f"note: {note}")
    print(f"JSON: {args.output}")
    return 1 if bad or not_cut else 0


if __name__ == "__main__":
    sys.exit(main())
