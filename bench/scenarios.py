"""Scenarios S1-S4, each run against one `bench.targets.Session` with one load generator.

- S1/S2 (`fanout`): C channels x S subscribers. A bounded as-fast-as-allowed
  step finds the highest deliveries/s; it counts if under 1 % of the
  expected deliveries are missing once the backlog has drained (up to
  `DRAIN_SECONDS`), else paced steps at 70 % of the previous rate follow
  until one does. Then a paced step at half that rate gives the latency.
  Herald is fed through its own publish path (`HttpBatchFeeder` or
  `WsFeeder`), a reference server by Redis PUBLISH (`RedisFeeder`).
- S3 (`idle`): connections/s for N connect + subscribe, then resident
  memory per connection.
- S4 (`http_publish`, Herald only): single publishes/s and batch messages/s
  over keep-alive HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.httpload import BATCH_OK, ClosedLoop, HttpBatchFeeder, build_request
from bench.loadgen import (
    PLAIN_PAYLOAD,
    Feeder,
    Publisher,
    Role,
    Totals,
    WsClient,
    WsFeeder,
    open_client,
)
from bench.procs import RESULTS
from bench.resp import RedisFeeder
from bench.targets import Mark, Session, usage

__all__ = [
    "DRAIN_SECONDS",
    "Connected",
    "FanoutSpec",
    "Plan",
    "connect_many",
    "fanout",
    "find_max",
    "http_publish",
    "idle",
    "progress",
    "run_step",
]

DRAIN_SECONDS = 5.0
"""How long a step's last deliveries may take; what arrives later counts as lost."""
SETTLE_SECONDS = 30.0
"""How long to wait for stragglers before the next step, so steps do not overlap."""
WARMUP_SECONDS = 1.0
SAMPLES_PER_SECOND = 200
"""Target timestamped publishes per second in S1's paced steps."""
MAX_STEP_SAMPLE_EVERY = 50
LOSS_LIMIT_PCT = 1.0
CONNECT_ATTEMPTS = 3
STEP_DOWN = 0.7


@dataclass(frozen=True)
class Plan:
    """How long and how hard to run, for every scenario."""

    seconds: float
    """Length of each measured step."""
    retries: int
    """Paced steps tried after a max step that lost too much."""
    concurrency: int
    """WebSocket connects in flight at once."""
    herald_feed: str
    """``batch`` (POST /v1/publish) or ``ws`` (publish frames) for Herald in S1/S2."""
    http_connections: int
    """Keep-alive connections for S4's single publishes."""
    profiler: str | None = None
    """py-spy to record the server with during each max step (None: no profile)."""


@dataclass(frozen=True)
class FanoutSpec:
    """One fan-out shape: channels x subscribers per channel, and its bounds."""

    label: str
    channels: int
    per_channel: int
    backlog: int
    """Most messages not yet received by all their subscribers."""
    window: int
    """Most messages without an answer from the server (or Redis)."""
    batch_max: int
    """Most items in one batch request (Herald fed over HTTP)."""
    feed_connections: int
    """Keep-alive connections of the HTTP batch feed."""
    sample_stride: int | None = None
    """Timestamp every ``stride``-th message and make channel ``k * stride``'s
    subscribers the probes (many channels); None: 10 probes spread over the
    subscribers of one channel, sampling by rate."""


def progress(text: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Connected:
    """Subscribers that made it, and what it took."""

    clients: list[WsClient]
    seconds: float
    retries: int
    """Connects that failed and were tried again (the server refused or dropped them)."""
    retry_examples: list[str]


async def connect_many(
    session: Session,
    totals: Totals,
    channels: list[str],
    count: int,
    probes: set[int],
    concurrency: int,
) -> Connected:
    """Open ``count`` subscribers (``i`` subscribes to ``channels[i % len]``); all or an error.

    A connect that fails is tried again (up to `CONNECT_ATTEMPTS` in all, after a
    short pause), as a client would; the retries are counted and reported.
    """
    semaphore = asyncio.Semaphore(concurrency)
    retried: list[str] = []

    async def one(index: int) -> WsClient:
        role: Role = "probe" if index in probes else "subscriber"
        channel = channels[index % len(channels)]
        async with semaphore:
            for attempt in range(1, CONNECT_ATTEMPTS + 1):
                try:
                    return await open_client(totals, session.port, role, channel, session.key, 30.0)
                except (OSError, TimeoutError) as exc:
                    if attempt == CONNECT_ATTEMPTS:
                        raise
                    retried.append(repr(exc)[:300])
                    await asyncio.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    seconds = time.perf_counter() - started
    clients = [r for r in results if isinstance(r, WsClient)]
    failures = [r for r in results if not isinstance(r, WsClient)]
    if failures:
        for client in clients:
            client.close()
        raise RuntimeError(f"{len(failures)} of {count} connects failed, e.g. {failures[0]!r}")
    return Connected(clients, seconds, len(retried), retried[:5])


async def run_step(
    publisher: Publisher,
    totals: Totals,
    mark: Callable[[], Mark],
    *,
    label: str,
    seconds: float,
    rate: float | None,
    every: int,
) -> dict[str, Any]:
    """One publishing window, then the drain; everything about it.

    ``mark`` snapshots the CPU time of every side (`Session.mark`); it is called
    right before and right after the publishing window.
    """
    loop = asyncio.get_running_loop()
    totals.samples = []
    totals.sampling = True
    closes_before = sum(totals.closes.values())
    errors_before = totals.error_count
    reads_before = totals.reads
    before = mark()
    counts = await publisher.run(seconds, rate, every)
    after = mark()
    expected = counts.published * publisher.fanout
    drain_start = loop.time()
    await publisher.wait_until(counts.first_received + expected, totals.sent, DRAIN_SECONDS)
    drain = loop.time() - drain_start
    totals.sampling = False
    received = totals.received - counts.first_received
    lost = expected - received
    if lost > 0:
        await publisher.wait_until(counts.first_received + expected, totals.sent, SETTLE_SECONDS)
    samples = sorted(totals.samples)
    elapsed = counts.seconds
    reads = totals.reads - reads_before
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
        "late_deliveries": totals.received - counts.first_received - received,
        "deliveries_per_read": counts.delivered / reads if reads else None,
        "unanswered_publishes": totals.sent - totals.acked,
        **usage(before, after),
        "server_us_per_delivery": (
            1e6 * (after.server - before.server) / counts.delivered if counts.delivered else None
        ),
        "latency": {
            "sample_every": every,
            "samples": len(samples),
            "p50_ms": percentile(samples, 0.50) / 1e6 if samples else None,
            "p99_ms": percentile(samples, 0.99) / 1e6 if samples else None,
            "max_ms": samples[-1] / 1e6 if samples else None,
        },
        "subscriber_closes": sum(totals.closes.values()) - closes_before,
        "client_errors": totals.error_count - errors_before,
    }


Step = Callable[[str, float, float | None], Awaitable[dict[str, Any]]]
"""Runs one step: ``(label, seconds, rate)``, rate None for as fast as allowed; its result."""


async def find_max(
    step: Step, seconds: float, retries: int, per_channel: int
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """The max step, paced steps at `STEP_DOWN` of what it delivered while 1 % or more is
    lost (up to ``retries``), then a paced step at half the accepted rate; each step
    lasts ``seconds``, and every message makes ``per_channel`` deliveries.

    Returns every step but the half one, the accepted step (the first under
    `LOSS_LIMIT_PCT` loss; None if none was) and the half-rate step.
    """
    steps = [await step("max", seconds, None)]
    accepted = steps[0] if steps[0]["loss_pct"] < LOSS_LIMIT_PCT else None
    for _ in range(retries):
        if accepted is not None:
            break
        # What the server delivered, not what the publisher managed to send.
        rate = STEP_DOWN * steps[-1]["deliveries_per_s"] / per_channel
        steps.append(await step(f"{rate:.3g}/s", seconds, rate))
        if steps[-1]["loss_pct"] < LOSS_LIMIT_PCT:
            accepted = steps[-1]
    basis = accepted or steps[-1]
    half = await step("half", seconds, 0.5 * basis["deliveries_per_s"] / per_channel)
    return steps, accepted, half


async def _feeder(
    session: Session, totals: Totals, names: list[str], spec: FanoutSpec, plan: Plan
) -> tuple[Feeder, list[str]]:
    notes: list[str] = []
    if not session.target.herald:
        assert session.redis_url is not None
        return await RedisFeeder.open(session.redis_url, totals, names), notes
    if plan.herald_feed == "batch" and not session.batch_publish:
        notes.append("POST /v1/publish missing (404): fed by WebSocket publish frames instead")
    if plan.herald_feed == "batch" and session.batch_publish:
        feeder = HttpBatchFeeder(totals, session.port, session.key, names, spec.batch_max)
        await feeder.open(spec.feed_connections)
        return feeder, notes
    client = await open_client(totals, session.port, "publisher", names[0], session.key)
    return WsFeeder(client, names), notes


async def fanout(
    session: Session, spec: FanoutSpec, plan: Plan, compare_rate: float | None = None
) -> dict[str, Any]:
    """S1/S2 against one session: set up, warm up, find the max, measure latency at half.

    With ``compare_rate`` (publishes/s: the raw reference's half step), a Herald
    target also gets a paced step at that rate, for latency at equal load.
    """
    names = [f"bench-{i:05d}" for i in range(spec.channels)]
    if session.target.herald:
        await session.create_channels(names)
    totals = Totals()
    count = spec.channels * spec.per_channel
    stride = spec.sample_stride
    if stride is not None:
        assert spec.channels % stride == 0, "sampled messages must reach probe channels"
        assert spec.per_channel == 1
        probes = set(range(0, count, stride))
    else:
        probes = {round(k * (count - 1) / 9) for k in range(10)}
    connected = await connect_many(session, totals, names, count, probes, plan.concurrency)
    clients, connect_s = connected.clients, connected.seconds
    connect_errors = totals.error_count
    setup: dict[str, Any] = {
        "subscribers": count,
        "channels": spec.channels,
        "probes": len(probes),
        "connect_seconds": round(connect_s, 3),
        "connections_per_s": count / connect_s,
        "connect_retries": connected.retries,
        "connect_retry_examples": connected.retry_examples,
        "backlog_messages": spec.backlog,
        "window_messages": spec.window,
    }
    feeder: Feeder | None = None
    gc.collect()
    gc.freeze()
    try:
        if not session.target.herald:
            listening = await session.wait_redis_subscribed(names)
            setup["redis_channels_listened"] = listening
            if listening < len(names):
                raise RuntimeError(f"the server listens on {listening} of {len(names)} channels")
        feeder, notes = await _feeder(session, totals, names, spec, plan)
        setup["feed"] = feeder.description
        setup["notes"] = notes
        progress(
            f"  {spec.label}: {count} subscribers in {connect_s:.1f} s; feed: {feeder.description}"
        )
        publisher = Publisher(
            feeder, totals, spec.per_channel, window=spec.window, backlog=spec.backlog
        )

        def every(rate: float | None) -> int:
            if stride is not None:
                return stride
            if rate is None:
                return MAX_STEP_SAMPLE_EVERY
            return max(1, round(rate / SAMPLES_PER_SECOND))

        async def step(label: str, seconds: float, rate: float | None) -> dict[str, Any]:
            result = await run_step(
                publisher,
                totals,
                session.mark,
                label=label,
                seconds=seconds,
                rate=rate,
                every=every(rate),
            )
            progress(
                f"    {label:>8}: {result['deliveries_per_s']:>10,.0f} deliveries/s, "
                f"loss {result['loss_pct']:.2f} %, server {result['server_cpu_pct']:.0f} % "
                f"+ redis {result['redis_cpu_pct']:.0f} %, loadgen "
                f"{result['loadgen_cpu_pct']:.0f} %, p99 {_ms(result['latency']['p99_ms'])} ms"
            )
            return result

        warmup = await step("warm-up", WARMUP_SECONDS, None)
        if warmup["received_after_drain"] == 0:
            raise RuntimeError(f"nothing delivered in the warm-up: {totals.errors[:3]}")
        profile = await _start_profile(session, spec.label, plan)
        steps, accepted, half = await find_max(step, plan.seconds, plan.retries, spec.per_channel)
        if profile is not None:
            setup["profile"] = await _finish_profile(*profile)
        basis = accepted or steps[-1]
        half_rate = 0.5 * basis["deliveries_per_s"] / spec.per_channel
        at_ref = None
        if compare_rate is not None and session.target.herald:
            at_ref = await step("at-ref", plan.seconds, compare_rate)
    finally:
        gc.unfreeze()
        for client in clients:
            client.close()
        if feeder is not None:
            feeder.close()
        await asyncio.sleep(0.2)
    setup["first_message_checked"] = totals.checked
    return {
        "setup": setup,
        "warmup": warmup,
        "steps": steps,
        "accepted": None if accepted is None else steps.index(accepted),
        "half": half,
        "half_rate": half_rate,
        "at_reference_rate": at_ref,
        "subscriber_closes": dict(totals.closes),
        "client_errors": totals.error_count - connect_errors,
        "client_error_examples": list(totals.errors),
        "row": {
            "value": basis["deliveries_per_s"],
            "unit": "deliveries/s",
            "loss_pct": basis["loss_pct"],
            **_cpu(basis),
            "p50_ms": half["latency"]["p50_ms"],
            "p99_ms": half["latency"]["p99_ms"],
            "p99_at_ref_ms": None if at_ref is None else at_ref["latency"]["p99_ms"],
            "passed": accepted is not None,
            "feed": setup["feed"],
            "notes": notes + _retry_note(connected),
        },
    }


async def _start_profile(
    session: Session, label: str, plan: Plan
) -> tuple[asyncio.subprocess.Process, Path] | None:
    """Start py-spy on the server for one step, if asked to (it costs CPU 1 a little)."""
    if plan.profiler is None:
        return None
    path = RESULTS / f"profile-{session.target.name}-{label.replace(' ', '-')}.txt"
    command = [plan.profiler, "record", "--pid", str(session.server.pid), "--format", "raw"]
    command += ["--duration", str(max(1, int(plan.seconds))), "--rate", "250"]
    command += ["--nonblocking", "-o", str(path)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return process, path


async def _finish_profile(process: asyncio.subprocess.Process, path: Path) -> str:
    """Wait for py-spy to write its file (bounded); where it is."""
    try:
        await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
    return str(path) if process.returncode == 0 else f"py-spy failed ({process.returncode})"


def _retry_note(connected: Connected) -> list[str]:
    return [f"{connected.retries} connects retried"] if connected.retries else []


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cpu(result: dict[str, Any]) -> dict[str, float]:
    keys = ("server_cpu_pct", "redis_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct")
    return {key: float(result[key]) for key in keys}


async def idle(session: Session, connections: int, plan: Plan) -> dict[str, Any]:
    """S3: connect + subscribe ``connections`` clients to 10 channels; conn/s and memory."""
    names = [f"bench-idle-{i}" for i in range(10)]
    if session.target.herald:
        await session.create_channels(names)
    await asyncio.sleep(0.5)
    idle_kib = session.server.rss_kib()
    totals = Totals()
    before = session.mark()
    connected = await connect_many(session, totals, names, connections, set(), plan.concurrency)
    clients, connect_s = connected.clients, connected.seconds
    after = session.mark()
    connect_errors = totals.error_count
    try:
        await asyncio.sleep(1.0)
        loaded_kib = session.server.rss_kib()
        still_open = totals.subscribers_open
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.2)
    cpu = usage(before, after)
    per_conn = loaded_kib / connections
    increase = (loaded_kib - idle_kib) / connections
    progress(
        f"  S3: {connections} connections in {connect_s:.1f} s ({connections / connect_s:,.0f}/s); "
        f"RSS {idle_kib / 1024:.1f} -> {loaded_kib / 1024:.1f} MiB"
    )
    return {
        "connections": connections,
        "connect_seconds": round(connect_s, 3),
        "connections_per_s": connections / connect_s,
        "open_after_1s": still_open,
        "server_rss_kib_idle": idle_kib,
        "server_rss_kib_loaded": loaded_kib,
        "kib_per_connection": per_conn,
        "kib_per_connection_over_idle": increase,
        "connect_cpu": cpu,
        "connect_retries": connected.retries,
        "connect_retry_examples": connected.retry_examples,
        "client_errors": totals.error_count - connect_errors,
        "client_error_examples": list(totals.errors),
        "rows": [
            {
                "metric": "connect",
                "value": connections / connect_s,
                "unit": "conns/s",
                **cpu,
                "notes": _retry_note(connected)
                + ([] if still_open == connections else [f"{still_open} still open"]),
            },
            {"metric": "RSS/conn", "value": per_conn, "unit": "KiB/conn"},
            {"metric": "+RSS/conn", "value": increase, "unit": "KiB/conn"},
        ],
    }


async def http_publish(session: Session, plan: Plan) -> dict[str, Any]:
    """S4 (Herald): single publishes/s and batch messages/s, closed loop over keep-alive."""
    channel = "bench-s4"
    await session.create_channels([channel])
    item = b'{"channel":"%s","payload":"%s"}' % (channel.encode(), PLAIN_PAYLOAD)
    single = build_request(
        "POST",
        f"/v1/channels/{channel}/publish",
        session.port,
        session.key,
        b'{"payload":"%s"}' % PLAIN_PAYLOAD,
    )
    runs: list[tuple[str, bytes, int, int, bool]] = [
        ("single", single, plan.http_connections, 201, False)
    ]
    if session.batch_publish:
        body = b"[" + b",".join([item] * 1000) + b"]"
        batch = build_request("POST", "/v1/publish", session.port, session.key, body)
        runs.append(("batch", batch, 4, 200, True))
    results: dict[str, Any] = {"rows": []}
    for name, request, conns, ok_status, count_items in runs:
        loop = ClosedLoop(
            session.port,
            request,
            conns,
            ok_status=ok_status,
            count_items=(lambda body: body.count(BATCH_OK)) if count_items else None,
        )
        await loop.start()
        try:
            await asyncio.sleep(WARMUP_SECONDS)
            profile = await _start_profile(session, f"S4 {name}", plan)
            before, responses, items = session.mark(), loop.responses, loop.items
            await asyncio.sleep(plan.seconds)
            after, responses, items = session.mark(), loop.responses - responses, loop.items - items
            if profile is not None:
                results[f"profile_{name}"] = await _finish_profile(*profile)
        finally:
            await loop.stop()
        cpu = usage(before, after)
        rate = items / cpu["window_s"]
        unit = "messages/s" if count_items else "publishes/s"
        progress(f"  S4 {name}: {rate:,.0f} {unit} over {conns} connections")
        results[name] = {
            "connections": conns,
            "items_per_request": 1000 if count_items else 1,
            "responses": responses,
            "items": items,
            "rate": rate,
            "failed_statuses": dict(loop.statuses),
            "failure_examples": loop.examples,
            "connection_errors": loop.errors(),
            **cpu,
        }
        failed = sum(loop.statuses.values())
        row = {"metric": name, "value": rate, "unit": unit, **cpu, "failed": failed}
        results["rows"].append(row)
    if not session.batch_publish:
        results["rows"].append(
            {"metric": "batch", "value": None, "unit": "messages/s", "notes": ["404: no batch"]}
        )
    return results
