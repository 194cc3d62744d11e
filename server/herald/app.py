"""Wiring: the Starlette app, its lifespan, and the uvicorn server around it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from herald import api_devices, metrics, openapi, web
from herald.access import AccessLog
from herald.api import HotPaths, error_handlers, routes
from herald.config import Settings
from herald.engines import make_engine
from herald.logs import configure
from herald.node import Node
from herald.transport import Connection, keepalive

__all__ = ["create_app", "run", "worker_app"]

# The collector's thresholds for a worker (CPython's default is 700, 10, 10). A
# young collection promotes whatever is alive at that moment, and a busy worker
# always has a batch of messages in flight: at 700 allocations per collection
# those promotions added up to a full collection every few seconds, 200 ms each
# with 10,000 connections open. Collecting the young generation every 50,000
# allocations promotes far less; on one core (bench/run.py --quick S2, paired
# runs) 10,000 channels went from 12.5-15k to 19.7-21k deliveries/s on Redis
# and p99 at half rate from 140-190 ms to 12-17 ms on the memory engine.
GC_THRESHOLDS = (50_000, 20, 10)


def create_app(settings: Settings) -> ASGIApp:
    """The ASGI app. Its lifespan starts a `Node` and shares it as ``state.node``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        node = Node(settings, make_engine(settings))
        await node.start()
        # What exists now (modules, routes, the node) lives as long as the worker. Out of
        # the collector's sight, the collections that busy publishing triggers stop
        # walking it again and again: batch publishes went from about 60k to 70k
        # messages/s on one core (bench/run.py S4, four paired runs).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        chores = [
            asyncio.create_task(chore)
            for chore in (keepalive(node), node.sweep_idle(), node.report_presence())
        ]
        try:
            yield {"node": node}
        finally:
            for chore in chores:
                chore.cancel()
            await node.stop()

    return AccessLog(
        HotPaths(
            Starlette(
                routes=[
                    *routes,
                    *api_devices.routes,
                    *openapi.routes,
                    *metrics.routes,
                    *web.routes,
                ],
                exception_handlers=error_handlers,
                lifespan=lifespan,
            )
        ),
        enabled=settings.access_log,
    )


def worker_app() -> ASGIApp:
    """App factory for worker processes: settings come from the ``HERALD_*`` environment."""
    settings = Settings.from_env()
    configure(settings.log_format, settings.log_level)
    return create_app(settings)


def run(settings: Settings, log_config: dict[str, Any]) -> None:
    """Serve HTTP and WebSocket on one port until SIGTERM or SIGINT.

    With several workers, uvicorn binds the socket once and each worker process
    accepts on it; the workers rebuild the settings from the environment.
    """
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "log_config": log_config,
        "access_log": False,
        # No proxy in front by default: trusting X-Forwarded-* would let any client
        # choose its address, and the middleware costs every request.
        "proxy_headers": False,
        "timeout_graceful_shutdown": 10,
    }
    if settings.workers == 1:
        config = uvicorn.Config(create_app(settings), ws=Connection, **common)
        # After its graceful shutdown uvicorn re-raises the signal it caught, which
        # would end the process "killed by SIGTERM"; the contract is exit 0.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        uvicorn.Server(config).run()
        return
    os.environ.update(settings.to_env())
    uvicorn.run(
        "herald.app:worker_app",
        factory=True,
        workers=settings.workers,
        ws="herald.transport:Connection",
        **common,
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
