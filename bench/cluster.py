"""Redis Cluster benchmark: Herald nodes on a 3-master/3-replica cluster, one node and two.

Starts a Redis Cluster (`tests.cluster.start_redis_cluster`: 3 masters with one
replica each) and two ``herald serve --redis-cluster ... --workers N`` nodes, then
runs one workload twice: first with every subscriber on node A and every publish
sent to it (the baseline), then with the subscribers split evenly over A and B
and the publishes split evenly between them. Each run reads the workers' memory
while the subscribers connect, fills every channel's history, finds the highest
publish rate with under 1 % loss the way S1/S2 of ``bench/run.py`` do (a bounded
as-fast-as-allowed step, paced steps at 70 % while too much is lost) and then runs
a paced step at half that rate. Around every step it reads the CPU time of every
process and ``INFO stats commandstats`` of every master, so the table shows Redis
commands per published message and how they spread over the shards. See
bench/README.md for the columns.

Usage: python bench/cluster.py [--subscribers 2000] [--channels 250] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/cluster.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import RedisClusterProcess, start_redis_cluster

from bench.httpload import HttpBatchFeeder, fetch
from bench.loadgen import PAYLOAD_BYTES, Publisher, Totals, WsClient
from bench.procs import (
    HOST,
    LOADGEN_CPU,
    RESULTS,
    SERVER_CPU,
    can_pin,
    cpu_seconds,
    free_port,
    log_problems,
    machine_busy_seconds,
    machine_facts,
    machine_irq_seconds,
    machine_steal_seconds,
    raise_nofile,
    start_herald,
    worker_pids,
)
from bench.report import LOADGEN_LIMIT_PCT, OTHER_LIMIT_PCT
from bench.resp import call
from bench.run import quiet_check, wait_quiet
from bench.scenarios import WARMUP_SECONDS, connect_many, find_max, progress, run_step
from bench.targets import Mark, Session, Target, loadavg
from herald.engines.redis import publish_script

TARGET = Target("herald-cluster", "herald")
NODE_NAMES = ("A", "B")
SAMPLED_CHANNELS = 10
"""Channels whose every message carries a timestamp (one in ``channels / 10``)."""
FILL_MARGIN = 1.2
"""The fill step lasts this much longer than the warm-up's rate says it needs."""
FILL_MAX_SECONDS = 30.0
IDLE_SETTLE_SECONDS = 1.0
"""Pause between the last connect and the memory reading."""
SCRIPT_COMMANDS = frozenset(
    name.lower() for name in re.findall(r"redis\.call\('(\w+)'", publish_script("SPUBLISH"))
)
"""What Herald's publish script calls. Redis counts a script's calls in commandstats
(and in total_commands_processed) like commands from clients; these names tell them
apart (nothing else calls them while messages are published)."""


# The processes


@dataclass
class HeraldNode:
    """One ``herald serve`` of the run: how to reach it, and its processes."""

    name: str
    session: Session
    workers: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    """Supervisor, workers and multiprocessing's resource tracker."""


@dataclass(frozen=True)
class RedisNode:
    """One ``redis-server`` of the cluster."""

    port: int
    pid: int
    master: bool

    @property
    def url(self) -> str:
        """For `bench.resp.call`."""
        return f"redis://{HOST}:{self.port}"


def start_node(
    name: str, cluster: RedisClusterProcess, key: str, workers: int, pin: bool
) -> Session:
    """``herald serve --redis-cluster URLS --workers N`` on a free port (pinned to the
    server CPU when ``pin``)."""
    port = free_port()
    args = ["--redis-cluster", cluster.url, "--workers", str(workers)]
    log = RESULTS / f"cluster-herald-{name.lower()}.log"
    proc = start_herald(port, key, log, pin, args=args)
    return Session(TARGET, proc, port, key)


async def ready_node(name: str, session: Session, workers: int) -> HeraldNode:
    """Wait until the node answers, and find its worker processes."""
    await session.wait_ready(60.0)
    deadline = time.monotonic() + 10
    while len(found := worker_pids(session.server)) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"herald {name}: {len(found)} of {workers} workers found")
        await asyncio.sleep(0.1)
    return HeraldNode(name, session, sorted(found), session.server.pids())


async def redis_nodes(cluster: RedisClusterProcess) -> list[RedisNode]:
    """Every node of the cluster with its process id (from ``INFO server``)."""
    masters = set(cluster.masters())
    nodes = []
    for port in cluster.ports:
        info = await call(f"redis://{HOST}:{port}", b"INFO", b"server")
        fields = _info_fields(info)
        nodes.append(RedisNode(port, int(fields["process_id"]), port in masters))
    return nodes


def cpus_of(pid: int) -> str:
    """The CPUs a process may run on (``Cpus_allowed_list``), as the kernel says."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def held_connections(pids: Sequence[int], port: int) -> dict[int, int]:
    """How many established TCP connections to ``port`` (on 127.0.0.1) each process holds:
    the socket inodes of ``/proc/net/tcp`` matched with the processes' descriptors."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                inodes.add(f"socket:[{parts[9]}]")
    held = {}
    for pid in pids:
        count = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    count += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
                except OSError:
                    continue
        except OSError:
            pass
        held[pid] = count
    return held


# Redis counters


def _info_fields(reply: object) -> dict[str, str]:
    if not isinstance(reply, bytes):
        raise RuntimeError(f"INFO answered {reply!r}")
    lines = reply.decode().splitlines()
    pairs = (line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@dataclass(frozen=True)
class RedisCounters:
    """One master's command calls (by command, from commandstats) and network bytes."""

    calls: dict[str, int]
    net_in: int
    net_out: int


async def redis_counters(masters: list[RedisNode]) -> dict[int, RedisCounters]:
    """``INFO stats commandstats`` of every master, by port."""
    found = {}
    for node in masters:
        fields = _info_fields(await call(node.url, b"INFO", b"stats", b"commandstats"))
        calls = {
            key.removeprefix("cmdstat_"): int(value.split(",", 1)[0].removeprefix("calls="))
            for key, value in fields.items()
            if key.startswith("cmdstat_")
        }
        found[node.port] = RedisCounters(
            calls, int(fields["total_net_input_bytes"]), int(fields["total_net_output_bytes"])
        )
    return found


def redis_load(
    before: dict[int, RedisCounters], after: dict[int, RedisCounters], published: int
) -> dict[str, Any]:
    """Commands (and bytes) the masters handled between two readings, per published
    message, in all and by kind, and how they split over the masters. The ``INFO``
    calls of this benchmark are left out."""
    per_master: dict[int, dict[str, int]] = {}
    for port, end in after.items():
        start = before[port].calls
        per_master[port] = {
            name: calls - start.get(name, 0)
            for name, calls in end.calls.items()
            if name != "info" and calls != start.get(name, 0)
        }
    by_command: dict[str, int] = {}
    for counts in per_master.values():
        for name, calls in counts.items():
            by_command[name] = by_command.get(name, 0) + calls
    total = sum(by_command.values())
    in_scripts = sum(calls for name, calls in by_command.items() if name in SCRIPT_COMMANDS)
    stored = by_command.get("xadd", 0)

    def each(calls: int) -> float | None:
        return calls / published if published else None

    masters = {}
    for port, counts in per_master.items():
        commands = sum(counts.values())
        masters[str(port)] = {
            "commands": commands,
            "commands_share_pct": 100.0 * commands / total if total else None,
            "stored_share_pct": 100.0 * counts.get("xadd", 0) / stored if stored else None,
            "net_in_bytes": after[port].net_in - before[port].net_in,
            "net_out_bytes": after[port].net_out - before[port].net_out,
            "by_command": counts,
        }
    net_in = sum(end.net_in - before[port].net_in for port, end in after.items())
    net_out = sum(end.net_out - before[port].net_out for port, end in after.items())
    return {
        "published": published,
        "commands": total,
        "per_message": {
            "all": each(total),
            "in_scripts": each(in_scripts),
            "sent_by_herald": each(total - in_scripts),
            "evalsha": each(by_command.get("evalsha", 0)),
            "spublish": each(by_command.get("spublish", 0)),
            "wait": each(by_command.get("wait", 0)),
            "hincrby": each(by_command.get("hincrby", 0)),
            "xadd": each(stored),
            "net_in_bytes": each(net_in),
            "net_out_bytes": each(net_out),
        },
        "by_command": dict(sorted(by_command.items(), key=lambda item: -item[1])),
        "masters": masters,
    }


# Feeding two nodes and counting per node


class SplitFeeder:
    """Splits every send evenly over several feeders (one per node).

    Each feeder numbers its messages on its own (0, 1, 2, ...), so each walks the
    channels in turn and timestamps the same channels; ``first`` is not used.
    """

    def __init__(self, feeders: Sequence[HttpBatchFeeder]) -> None:
        self.feeders = list(feeders)
        self.sent = [0] * len(self.feeders)
        """Messages handed to each feeder so far."""
        self._turn = 0
        each = self.feeders[0]
        self.description = f"{each.description}, split evenly over {len(self.feeders)} node(s)"

    def send(self, first: int, count: int, every: int) -> None:
        """Give each feeder its share of ``count`` messages (the odd ones in turn)."""
        n = len(self.feeders)
        for k in range(n):
            index = (self._turn + k) % n
            share = count // n + (1 if k < count % n else 0)
            if share:
                self.feeders[index].send(self.sent[index], share, every)
                self.sent[index] += share
        self._turn = (self._turn + count) % n

    def close(self) -> None:
        """Drop every feeder's connections."""
        for feeder in self.feeders:
            feeder.close()


@dataclass
class Edge:
    """Everything counted at one edge of a publishing window."""

    mark: Mark
    cpu: dict[str, float]
    """CPU seconds by process label."""
    delivered: list[int]
    """Frames received by the subscribers of each node of the configuration."""
    published: list[int]
    """Messages handed to each node's feeder."""
    requests: int
    """Batch requests sent to all nodes."""
    irq: float
    """Interrupt time of the whole machine (`machine_irq_seconds`)."""
    steal: float
    """Time the hypervisor took from the machine (`machine_steal_seconds`)."""


class Meter:
    """What `run_step` reads at the edges of a step: the `Mark` it wants (Herald as the
    server, all six redis-servers as its Redis), and, kept in `edges`, CPU time by
    process and the counts per node."""

    def __init__(self, herald: list[HeraldNode], redis: list[RedisNode]) -> None:
        self.herald = herald
        self.redis = redis
        self.clients: list[list[WsClient]] = []
        self.feeder: SplitFeeder | None = None
        self.edges: list[Edge] = []

    def mark(self) -> Mark:
        """Read everything; the aggregate for `run_step`."""
        wall = time.perf_counter()
        loadgen = time.process_time()
        cpu: dict[str, float] = {}
        for node in self.herald:
            cpu[node.name] = cpu_seconds(node.pids)
            for pid in node.workers:
                cpu[f"{node.name}/{pid}"] = cpu_seconds([pid])
        for redis in self.redis:
            cpu[f"redis {redis.port}"] = cpu_seconds([redis.pid])
        mark = Mark(
            wall=wall,
            server=sum(cpu[node.name] for node in self.herald),
            redis=sum(cpu[f"redis {redis.port}"] for redis in self.redis),
            loadgen=loadgen,
            machine=machine_busy_seconds(),
        )
        delivered = [sum(client.received for client in clients) for clients in self.clients]
        feeder = self.feeder
        published = list(feeder.sent) if feeder is not None else []
        requests = sum(one.requests for one in feeder.feeders) if feeder is not None else 0
        self.edges.append(
            Edge(
                mark,
                cpu,
                delivered,
                published,
                requests,
                machine_irq_seconds(),
                machine_steal_seconds(),
            )
        )
        return mark


def edge_usage(before: Edge, after: Edge) -> dict[str, Any]:
    """Per process CPU % and per node rates between two edges."""
    wall = max(after.mark.wall - before.mark.wall, 1e-9)
    requests = after.requests - before.requests
    published = sum(after.published) - sum(before.published)
    return {
        "irq_cpu_pct": 100.0 * (after.irq - before.irq) / wall,
        "steal_cpu_pct": 100.0 * (after.steal - before.steal) / wall,
        "items_per_request": published / requests if requests else None,
        "cpu_pct": {
            name: 100.0 * (after.cpu[name] - before.cpu[name]) / wall for name in after.cpu
        },
        "deliveries_per_s_by_node": [
            (end - start) / wall
            for start, end in zip(before.delivered, after.delivered, strict=True)
        ],
        "publishes_per_s_by_node": [
            (end - start) / wall
            for start, end in zip(before.published, after.published, strict=True)
        ],
    }


# One configuration


@dataclass
class Run:
    """What the whole run shares: its flags, processes and channels."""

    args: argparse.Namespace
    herald: list[HeraldNode]
    redis: list[RedisNode]
    channels: list[str]
    meter: Meter
    history_size: int
    """Of every channel (Herald's default): messages kept before publishes trim."""
    filled: int = 0
    """Messages published so far (all channels)."""
    results: list[dict[str, Any]] = field(default_factory=list)
    """One per configuration (`configuration`), with its `capacity`."""
    placement: str = ""

    @property
    def masters(self) -> list[RedisNode]:
        """The masters, by port."""
        return [node for node in self.redis if node.master]


Workers = dict[int, tuple[int, int]]
"""Worker pid -> (established connections it holds on its node's port, RSS KiB)."""


def workers_now(nodes: list[HeraldNode]) -> Workers:
    """Connections held and resident memory of every worker of ``nodes``."""
    found = {}
    for node in nodes:
        held = held_connections(node.workers, node.session.port)
        for pid in node.workers:
            found[pid] = (held[pid], node.session.server.rss_kib([pid]))
    return found


def memory_row(
    node: str,
    worker: int | str,
    idle: tuple[int, int],
    half: tuple[int, int],
    full: tuple[int, int],
) -> dict[str, Any]:
    """A worker's (or a node's) memory: (connections, RSS KiB) before connecting, with
    half the subscribers and with all; KiB per connection on average, and over the
    second half."""
    added = full[0] - half[0]
    return {
        "node": node,
        "worker": worker,
        "connections_idle": idle[0],
        "connections_half": half[0],
        "connections": full[0],
        "rss_kib_idle": idle[1],
        "rss_kib_half": half[1],
        "rss_kib": full[1],
        "kib_per_connection": (full[1] - idle[1]) / full[0] if full[0] else None,
        "kib_per_added_connection": (full[1] - half[1]) / added if added else None,
    }


@dataclass
class Connected:
    """Every node's subscribers, and what connecting them showed."""

    clients: list[list[WsClient]]
    seconds: float
    retries: int
    retry_examples: list[str]
    errors: list[str]
    """What the server answered to the connects that failed."""
    memory: list[dict[str, Any]]
    """Per worker: connections and RSS before connecting, half-way and at the end."""


async def connect_all(
    run: Run, nodes: list[HeraldNode], totals: Totals, probes: set[int]
) -> Connected:
    """Connect ``args.subscribers`` split evenly over ``nodes`` in two halves, reading
    each worker's connections and RSS before, between and after (each after a pause).

    Node-local subscriber i takes channel i % len(channels) (the second half goes on
    where the first stopped), ``probes`` are node-local indices. The increase over the
    second half is the cost of a connection; the first half also pays for what a
    worker sets up once (its Redis connection pool, its topic subscriptions).
    """
    args, channels = run.args, run.channels
    per_node = args.subscribers // len(nodes)
    first = per_node // 2
    clients: list[list[WsClient]] = [[] for _ in nodes]
    readings = [workers_now(nodes)]
    seconds, retries, examples = 0.0, 0, []
    try:
        for start, count in ((0, first), (first, per_node - first)):
            turn = start % len(channels)
            ring = channels[turn:] + channels[:turn]
            ours = {i - start for i in probes if start <= i < start + count}
            for index, node in enumerate(nodes):
                connected = await connect_many(
                    node.session, totals, ring, count, ours, args.concurrency
                )
                clients[index] += connected.clients
                seconds += connected.seconds
                retries += connected.retries
                examples += connected.retry_examples
            await asyncio.sleep(IDLE_SETTLE_SECONDS)
            readings.append(workers_now(nodes))
    except BaseException:
        for group in clients:
            for client in group:
                client.close()
        raise
    errors = list(totals.errors)
    totals.errors, totals.error_count = [], 0
    rows = [
        memory_row(node.name, pid, *(reading[pid] for reading in readings))
        for node in nodes
        for pid in node.workers
    ]
    return Connected(clients, seconds, retries, examples[:5], errors[:5], rows)


async def configuration(run: Run, label: str, nodes: list[HeraldNode]) -> dict[str, Any]:
    """Subscribers split evenly over ``nodes``, publishes split evenly between them: set
    up, read the memory, warm up, find the max rate, measure the half rate."""
    args = run.args
    totals = Totals()
    channels = run.channels
    per_channel = args.subscribers // len(channels)
    stride = len(channels) // SAMPLED_CHANNELS
    # The probes: two subscribers of each sampled channel in all, whatever the number
    # of nodes.
    probes = set(range(0, 2 * len(channels) // len(nodes), stride))
    gc.collect()
    connected = await connect_all(run, nodes, totals, probes)
    clients = connected.clients
    held = connected.memory
    feeders: list[HttpBatchFeeder] = []
    fill: dict[str, Any] | None = None
    try:
        progress(
            f"  {label}: {args.subscribers} subscribers connected in {connected.seconds:.1f} s; "
            + ", ".join(
                f"{row['node']}/{row['worker']} {row['connections']} conns "
                f"{row['rss_kib'] / 1024:.0f} MiB"
                for row in held
            )
        )
        for node in nodes:
            one = HttpBatchFeeder(totals, node.session.port, node.session.key, channels, args.batch)
            feeders.append(one)
            await one.open(args.feed_connections)
            # Which worker took each feed connection is the kernel's choice; the worker
            # that did also parses and stores what comes over it.
            now = held_connections(node.workers, node.session.port)
            for row in held:
                if row["node"] == node.name:
                    row["feed_connections"] = now[row["worker"]] - row["connections"]
        feeder = SplitFeeder(feeders)
        run.meter.clients = clients
        run.meter.feeder = feeder
        publisher = Publisher(feeder, totals, per_channel, window=args.window, backlog=args.backlog)
        gc.freeze()

        async def step(name: str, seconds: float, rate: float | None) -> dict[str, Any]:
            counters = await redis_counters(run.masters)
            result = await run_step(
                publisher,
                totals,
                run.meter.mark,
                label=name,
                seconds=seconds,
                rate=rate,
                every=stride,
            )
            result.update(edge_usage(*run.meter.edges[-2:]))
            # usage() counts interrupt time (no process's: on loopback mostly this run's
            # TCP work) and steal (the hypervisor's) as other processes'; shown apart.
            apart = result["irq_cpu_pct"] + result["steal_cpu_pct"]
            result["other_cpu_pct"] = max(0.0, result["other_cpu_pct"] - apart)
            # After the drain: every command of this step's messages is in.
            after = await redis_counters(run.masters)
            result["redis"] = redis_load(counters, after, result["published"])
            cpu = result["cpu_pct"]
            per_node = " + ".join(f"{rate:,.0f}" for rate in result["deliveries_per_s_by_node"])
            progress(
                f"    {name:>8}: {result['publishes_per_s']:>8,.0f} msg/s, {per_node} "
                f"deliveries/s, loss {result['loss_pct']:.2f} %, herald "
                f"{result['server_cpu_pct']:.0f} %, masters "
                + "/".join(f"{cpu[f'redis {m.port}']:.0f}" for m in run.masters)
                + f" %, loadgen {result['loadgen_cpu_pct']:.0f} %, "
                f"p99 {_ms(result['latency']['p99_ms'])} ms"
            )
            return result

        warmup = await step("warm-up", WARMUP_SECONDS, None)
        if warmup["received_after_drain"] == 0:
            raise RuntimeError(f"nothing delivered in the warm-up: {totals.errors[:3]}")
        # Until every channel's history is full, a publish trims nothing: fill them first,
        # so that every measured step costs what a publish costs in the long run.
        left = run.history_size * len(channels) - run.filled
        run.filled += warmup["published"]
        if left > warmup["published"]:
            seconds = FILL_MARGIN * left / max(warmup["publishes_per_s"], 1.0)
            fill = await step("fill", min(seconds, FILL_MAX_SECONDS), None)
            run.filled += fill["published"]
        steps, accepted, half = await find_max(step, args.seconds, args.retries, per_channel)
    finally:
        gc.unfreeze()
        for group in clients:
            for client in group:
                client.close()
        for one in feeders:
            one.close()
        run.meter.clients, run.meter.feeder = [], None
        await asyncio.sleep(0.5)
    return {
        "label": label,
        "nodes": [node.name for node in nodes],
        "subscribers_per_node": args.subscribers // len(nodes),
        "subscribers_per_channel": per_channel,
        "probes_per_node": len(probes),
        "connect_seconds": round(connected.seconds, 3),
        "connect_retries": connected.retries,
        "connect_retry_examples": connected.retry_examples,
        "connect_errors": connected.errors,
        "feed": feeder.description,
        "memory": held,
        "warmup": warmup,
        "fill": fill,
        "steps": steps,
        "accepted": None if accepted is None else steps.index(accepted),
        "half": half,
        "subscriber_closes": dict(totals.closes),
        "client_errors": totals.error_count,
        "client_error_examples": list(totals.errors),
        "first_message_checked": totals.checked,
    }


# The report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _per(values: Sequence[float | None], digits: int = 0) -> str:
    return " / ".join(_n(value, digits) for value in values)


def basis(result: dict[str, Any]) -> dict[str, Any]:
    """The step a configuration's figures come from: the accepted one, or the last."""
    index = result["accepted"]
    step: dict[str, Any] = result["steps"][-1 if index is None else index]
    return step


def column(run: Run, result: dict[str, Any], step: dict[str, Any]) -> list[tuple[str, str]]:
    """The cells of one step of one configuration: (row name, value)."""
    cpu = step["cpu_pct"]
    each = step["redis"]["per_message"]
    shares = step["redis"]["masters"]
    masters = [str(node.port) for node in run.masters]
    herald = sum(cpu[node.name] for node in run.herald)
    latency = step["latency"]
    replicas = sum(cpu[f"redis {node.port}"] for node in run.redis if not node.master)
    name = step["step"]
    if step is result["half"]:
        name = f"half: {step['target_publishes_per_s']:,.0f}/s"
    elif step["target_publishes_per_s"] is not None:
        name = f"paced: {step['target_publishes_per_s']:,.0f}/s"
    if step is not result["half"] and result["accepted"] is None:
        name += " (>= 1% loss)"
    return [
        ("Herald nodes x workers", f"{len(result['nodes'])} x {run.args.workers}"),
        ("subscribers per node", _per([result["subscribers_per_node"]] * len(result["nodes"]))),
        ("step", name),
        ("published msg/s", _n(step["publishes_per_s"])),
        ("  per node", _per(step["publishes_per_s_by_node"])),
        ("  items per batch request", _n(step["items_per_request"])),
        ("deliveries/s", _n(step["deliveries_per_s"])),
        ("  per node", _per(step["deliveries_per_s_by_node"])),
        ("loss %", f"{step['loss_pct']:.2f}"),
        ("p50 / p99 ms", f"{_ms(latency['p50_ms'])} / {_ms(latency['p99_ms'])}"),
        ("Herald CPU % (A / B)", _per([cpu[node.name] for node in run.herald])),
        ("deliveries / Herald CPU-s", _n(step["deliveries_per_s"] * 100 / herald)),
        (f"master CPU % ({' / '.join(masters)})", _per([cpu[f"redis {p}"] for p in masters])),
        ("replicas CPU % (summed)", _n(replicas)),
        ("load generator CPU %", _n(step["loadgen_cpu_pct"])),
        ("interrupts CPU %", _n(step["irq_cpu_pct"])),
        ("stolen by the hypervisor %", _n(step["steal_cpu_pct"])),
        ("other processes CPU %", _n(step["other_cpu_pct"])),
        ("Redis commands / msg", _n(each["all"], 2)),
        ("  inside the publish script", _n(each["in_scripts"], 2)),
        ("  sent by Herald", _n(each["sent_by_herald"], 3)),
        ("  EVALSHA", _n(each["evalsha"], 3)),
        ("  SPUBLISH (in the script)", _n(each["spublish"], 3)),
        ("  WAIT", _n(each["wait"], 3)),
        ("  HINCRBY (channel counts)", _n(each["hincrby"], 3)),
        ("commands % per master", _per([shares[p]["commands_share_pct"] for p in masters])),
        ("messages % per master", _per([shares[p]["stored_share_pct"] for p in masters])),
    ]


def table(run: Run, results: list[dict[str, Any]]) -> str:
    """Two columns per configuration (its accepted step, and the half-rate one), one
    row per figure (see `column`)."""
    heads = [f"{r['label']}{suffix}" for r in results for suffix in ("", ", half")]
    columns = [column(run, r, step) for r in results for step in (basis(r), r["half"])]
    names = [name for name, _ in columns[0]]
    name_width = max(len(name) for name in names)
    widths = [
        max(len(head), *(len(cell) for _, cell in cells))
        for head, cells in zip(heads, columns, strict=True)
    ]
    lines = [" " * name_width + "".join(f"  {h:>{w}}" for h, w in zip(heads, widths, strict=True))]
    for i, name in enumerate(names):
        cells = "".join(f"  {c[i][1]:>{w}}" for c, w in zip(columns, widths, strict=True))
        lines.append(f"{name:<{name_width}}{cells}")
    return "\n".join(lines)


def capacity(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    """The figures a capacity model needs, from one configuration's accepted step."""
    step = basis(result)
    cpu = step["cpu_pct"]
    workers = [f"{node.name}/{pid}" for node in run.herald for pid in node.workers]
    worker_cores = sum(cpu[name] for name in workers) / 100
    masters = {}
    for node in run.masters:
        share = step["redis"]["masters"][str(node.port)]["stored_share_pct"] or 0.0
        rate = step["publishes_per_s"] * share / 100
        core = cpu[f"redis {node.port}"] / 100
        masters[str(node.port)] = {
            "messages_per_s": rate,
            "cpu_pct": 100 * core,
            "cpu_us_per_message": 1e6 * core / rate if rate else None,
        }
    return {
        "feed_connections_by_worker": {
            f"{row['node']}/{row['worker']}": row["feed_connections"] for row in result["memory"]
        },
        "deliveries_per_s": step["deliveries_per_s"],
        "herald_worker_cores": worker_cores,
        "deliveries_per_worker_core_s": step["deliveries_per_s"] / worker_cores
        if worker_cores
        else None,
        "herald_worker_cpu_us_per_published": 1e6 * worker_cores / step["publishes_per_s"]
        if step["publishes_per_s"]
        else None,
        "masters": masters,
        "redis_per_message": step["redis"]["per_message"],
    }


def report_lines(run: Run, results: list[dict[str, Any]]) -> list[str]:
    """The lines under the table: capacity figures, memory, and anything to look at."""
    lines = []
    for result in results:
        figures = result["capacity"]
        step = basis(result)
        masters = figures["masters"]
        lines.append(
            f"{result['label']}: {_n(figures['deliveries_per_worker_core_s'])} deliveries per "
            f"Herald worker CPU-second ({figures['herald_worker_cores']:.2f} worker cores busy)"
        )
        workers = figures["feed_connections_by_worker"].items()
        lines.append(
            "  workers (CPU %, batch-publish connections): "
            + ", ".join(f"{name} {step['cpu_pct'][name]:.0f} % {feeds}" for name, feeds in workers)
        )
        lines.append(
            "  masters (messages stored/s, CPU %, CPU us/message): "
            + ", ".join(
                f"{port} {_n(m['messages_per_s'])} {m['cpu_pct']:.1f} % "
                f"{_n(m['cpu_us_per_message'], 1)}"
                for port, m in masters.items()
            )
        )
    lines.append(
        "memory with the connections idle (connections; RSS before connecting -> with half "
        "-> with all; KiB per connection on average, and over the second half):"
    )
    seen: set[int] = set()
    for result in results:
        for node in result["nodes"]:
            rows = [row for row in result["memory"] if row["node"] == node]
            reused = any(row["worker"] in seen for row in rows)
            seen.update(row["worker"] for row in rows)
            readings = [
                tuple(
                    sum(row[f"{what}{at}"] for row in rows) for what in ("connections", "rss_kib")
                )
                for at in ("_idle", "_half", "")
            ]
            total = memory_row(node, "all", *readings)
            for row in [*rows, total]:
                mib = [row[key] / 1024 for key in ("rss_kib_idle", "rss_kib_half", "rss_kib")]
                lines.append(
                    f"  {result['label']:<8} {node}/{row['worker']}: {row['connections']:,}; "
                    + " -> ".join(f"{value:.1f}" for value in mib)
                    + f" MiB; {_n(row['kib_per_connection'], 1)}, "
                    f"{_n(row['kib_per_added_connection'], 1)} KiB"
                    + (" (workers reused: freed memory is not returned)" if reused else "")
                )
    for result in results:
        notes = []
        fill = [result["fill"]] if result["fill"] is not None else []
        for step in [result["warmup"], *fill, *result["steps"], result["half"]]:
            if step["steal_cpu_pct"] > OTHER_LIMIT_PCT:
                notes.append(
                    f"the hypervisor took {step['steal_cpu_pct']:.0f} % of a CPU (steal) in step "
                    f"{step['step']}: disturbed"
                )
            if step["other_cpu_pct"] > OTHER_LIMIT_PCT:
                notes.append(
                    f"other processes used {step['other_cpu_pct']:.0f} % of a CPU in step "
                    f"{step['step']}: disturbed"
                )
            if step["loadgen_cpu_pct"] > LOADGEN_LIMIT_PCT:
                notes.append(f"load generator above {LOADGEN_LIMIT_PCT:.0f} % in {step['step']}")
            if step["late_deliveries"]:
                notes.append(f"{step['late_deliveries']} late deliveries in {step['step']}")
        if result["accepted"] is None:
            notes.append("no step lost under 1 %: the table shows the last one")
        if result["connect_retries"]:
            notes.append(
                f"{result['connect_retries']} subscriber connects failed and were retried; "
                f"the server said: {result['connect_errors'][:1]}"
            )
        if result["subscriber_closes"]:
            notes.append(f"subscribers closed by the server: {result['subscriber_closes']}")
        if result["client_errors"]:
            notes.append(
                f"{result['client_errors']} client errors, "
                f"e.g. {result['client_error_examples'][:2]}"
            )
        lines += [f"note ({result['label']}): {note}" for note in notes]
    return lines


def placement(run: Run, pin: bool) -> str:
    """Where each process was allowed to run, as the kernel reports it."""
    herald = ", ".join(
        f"herald {node.name} (supervisor + {len(node.workers)} workers) CPU "
        + "/".join(sorted({cpus_of(pid) for pid in node.pids}))
        for node in run.herald
    )
    redis = "/".join(sorted({cpus_of(node.pid) for node in run.redis}))
    where = f"{herald}; 6 redis-servers CPU {redis}; load generator CPU {cpus_of(os.getpid())}"
    return where if pin else f"not pinned: {where}"


# Running it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=2000, help="subscriber connections")
    parser.add_argument("--channels", type=int, default=250, help="channels they subscribe to")
    parser.add_argument("--workers", type=int, default=2, help="workers of each Herald node")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each step")
    parser.add_argument(
        "--retries", type=int, default=1, help="paced steps at 70%% after a max step losing >= 1%%"
    )
    parser.add_argument(
        "--backlog", type=int, default=4096, help="most messages not yet received by everyone"
    )
    parser.add_argument("--window", type=int, default=4096, help="most unanswered messages")
    parser.add_argument("--batch", type=int, default=500, help="most items in one batch request")
    parser.add_argument(
        "--feed-connections", type=int, default=4, help="batch-publish connections per node"
    )
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight")
    parser.add_argument("--no-pin", action="store_true", help="let every process run anywhere")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to use < 10%% CPU",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "cluster.json", help="where the JSON goes"
    )
    args = parser.parse_args(argv)
    positive = ("subscribers", "channels", "workers", "seconds", "backlog", "window", "batch")
    if any(getattr(args, name) <= 0 for name in positive) or args.feed_connections < 1:
        parser.error("sizes and --seconds must be positive")
    if args.channels % SAMPLED_CHANNELS or args.subscribers % (2 * args.channels):
        parser.error(
            f"--channels must be a multiple of {SAMPLED_CHANNELS} and --subscribers of "
            "2 x --channels (every channel gets the same subscribers on each node)"
        )
    return args


async def measure(args: argparse.Namespace, cluster: RedisClusterProcess, pin: bool) -> Run:
    """Start the Herald nodes, then both configurations; the run with its results."""
    key = "bench-" + secrets.token_urlsafe(24)
    herald: list[HeraldNode] = []
    sessions: list[Session] = []
    try:
        for name in NODE_NAMES:
            # One after the other: the first creates the app and admin key in Redis.
            session = start_node(name, cluster, key, args.workers, pin)
            sessions.append(session)
            herald.append(await ready_node(name, session, args.workers))
        progress("Herald " + ", ".join(f"{n.name} on port {n.session.port}" for n in herald))
        redis = await redis_nodes(cluster)
        channels = [f"bench-{i:04d}" for i in range(args.channels)]
        await herald[0].session.create_channels(channels)
        status, body = await fetch(
            herald[0].session.port, "GET", f"/v1/channels/{channels[0]}", key
        )
        if status != 200:
            raise RuntimeError(f"GET /v1/channels/{channels[0]}: {status} {body[:200]!r}")
        history = int(orjson.loads(body)["data"]["history_size"])
        run = Run(args, herald, redis, channels, Meter(herald, redis), history)
        for label, nodes in (("1 node", herald[:1]), ("2 nodes", herald)):
            result = await configuration(run, label, nodes)
            result["capacity"] = capacity(run, result)
            run.results.append(result)
        run.placement = placement(run, pin)
    finally:
        for session in sessions:
            session.server.stop()
    return run


def _load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def main(argv: list[str] | None = None) -> int:
    """Start everything, run both configurations, print the table, write the JSON."""
    args = parse_args(argv)
    needed = args.subscribers + 512
    soft, _ = raise_nofile(needed)
    if soft < needed:
        print(f"open-files limit {soft} is too low for {args.subscribers} subscribers")
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pin = can_pin() and not args.no_pin
    waited = 0.0
    if args.wait_quiet > 0:
        waited, _ = uvloop.run(wait_quiet(args.wait_quiet))
    load_before = loadavg()
    busy_before = quiet_check()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="herald-bench-cluster-") as directory:
        progress("starting a Redis Cluster (3 masters, 3 replicas)")
        if pin:
            # The cluster's redis-servers inherit this process's CPUs: the server CPU.
            os.sched_setaffinity(0, {SERVER_CPU})
        try:
            cluster = start_redis_cluster(Path(directory))
        finally:
            if pin:
                os.sched_setaffinity(0, {LOADGEN_CPU})
        try:
            run = uvloop.run(measure(args, cluster, pin))
        finally:
            cluster.stop()
    minutes = (time.monotonic() - started) / 60
    load_after = loadavg()

    problems = {node.name: log_problems(node.session.server.log_path) for node in run.herald}
    herald = [
        {
            "node": node.name,
            "port": node.session.port,
            "workers": node.workers,
            "log": str(node.session.server.log_path),
            "exit_code": node.session.server.popen.returncode,
            "log_problems": len(problems[node.name]),
            "log_problem_examples": problems[node.name][:10],
        }
        for node in run.herald
    ]
    report = {
        "benchmark": "cluster",
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            **machine_facts(load_before, load_after),
            "other_cpu_pct_before": busy_before,
            "waited_for_quiet_s": round(waited, 1),
        },
        "config": {
            **{
                key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()
            },
            "payload_bytes": PAYLOAD_BYTES,
            "placement": run.placement,
            "script_commands": sorted(SCRIPT_COMMANDS),
        },
        "herald": herald,
        "redis": [vars(node) for node in run.redis],
        "results": run.results,
    }
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")

    print()
    print(
        f"Herald on a Redis Cluster (3 masters + 3 replicas): {args.subscribers:,} subscribers "
        f"over {args.channels} channels, {PAYLOAD_BYTES}-byte payloads, batch POST /v1/publish "
        f"to every node, {args.seconds:g} s steps; {minutes:.1f} min"
    )
    print(f"placement: {run.placement}")
    print(f"load average before: {_load(load_before)}   after: {_load(load_after)}")
    if busy_before > OTHER_LIMIT_PCT:
        print(f"note: before the run other processes used {busy_before:.0f} % of a CPU")
    print(table(run, run.results))
    for line in report_lines(run, run.results):
        print(line)
    for node in run.herald:
        if problems[node.name]:
            path = node.session.server.log_path
            print(f"note: {len(problems[node.name])} warning/error lines in {path}")
    print(f"JSON: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
