"""Prometheus metrics, summed over every worker process.

`herald serve` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
anything imports this module (`herald.cli.use_multiprocess_dir`); each process then keeps its values
in memory-mapped files there, and ``/metrics`` on any worker reads them all.
Gauges count only live processes: the files of a worker that died (SIGKILL,
no chance to clean up) are dropped when ``/metrics`` is read.

The fan-out path pays one counter increment per message (not per subscriber),
and the publish→fan-out latency is observed on one message in
``_LATENCY_SAMPLE``.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = [
    "CONNECTIONS",
    "DELIVERED",
    "DROPPED",
    "ENGINE_ERRORS",
    "PUBLISHED",
    "RECOVERIES",
    "SLOW_CONSUMERS",
    "SUBSCRIPTIONS",
    "TOPICS",
    "observe_latency",
    "routes",
]

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_SAMPLE = 8  # observe one message's publish→fan-out latency in this many

CONNECTIONS = Gauge(
    "herald_connections", "Open WebSocket connections.", multiprocess_mode="livesum"
)
SUBSCRIPTIONS = Gauge(
    "herald_subscriptions",
    "Live subscriptions (one per connection and topic).",
    multiprocess_mode="livesum",
)
TOPICS = Gauge(
    "herald_topics",
    "Topics a worker listens to on the engine (summed over workers).",
    multiprocess_mode="livesum",
)
PUBLISHED = Counter("herald_messages_published", "Messages stored and handed to the broker.")
DELIVERED = Counter("herald_messages_delivered", "Message frames queued for subscribers.")
DROPPED = Counter(
    "herald_messages_dropped", "Frames dropped instead of sent: their connection was too slow."
)
SLOW_CONSUMERS = Counter(
    "herald_slow_consumer_closes", "Connections closed 4008 for an unsent backlog."
)
RECOVERIES = Counter(
    "herald_recoveries", "Subscribes with since, by whether the replay was complete.", ["recovered"]
)
ENGINE_ERRORS = Counter(
    "herald_engine_errors", "Requests that failed because the engine (Redis) was unavailable."
)
LATENCY = Histogram(
    "herald_publish_fanout_seconds",
    "From a message's created_at to its fan-out on a worker (sampled).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

_seen = 0


def observe_latency(created_at: str) -> None:
    """Record publish→fan-out latency (until now) for one message in `_LATENCY_SAMPLE`."""
    global _seen
    _seen += 1
    if _seen % _LATENCY_SAMPLE:
        return  # the clock is read only for the sampled ones: this runs per message
    created = datetime.fromisoformat(created_at).timestamp()
    LATENCY.observe(max(0.0, time.time() - created))


def _drop_dead_processes(directory: str) -> None:
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call,unused-ignore]
        except PermissionError:  # alive, someone else's
            pass


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format, summed over the workers."""
    directory = os.environ.get(_ENV)
    if directory:
        with contextlib.suppress(OSError):
            _drop_dead_processes(directory)
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call,unused-ignore]
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


routes = [Route("/metrics", metrics, methods=["GET"])]
"""The metrics route."""
