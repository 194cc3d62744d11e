"""Wiring: the Starlette app, its lifespan, and the uvicorn server around it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette

from herald.api import error_handlers, routes
from herald.config import Settings
from herald.engines.base import Engine
from herald.engines.memory import MemoryEngine
from herald.node import Node
from herald.transport import Connection, keepalive

__all__ = ["create_app", "make_engine", "run"]

logger = logging.getLogger("herald")


def make_engine(settings: Settings) -> Engine:
    """The engine the settings ask for."""
    if settings.redis_url:
        raise NotImplementedError("the Redis engine is not available in this version")
    return MemoryEngine()


def create_app(settings: Settings, on_ready: Callable[[Node], None] | None = None) -> Starlette:
    """The ASGI app. Its lifespan starts a `Node` and shares it as ``state.node``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        node = Node(settings, make_engine(settings))
        await node.start()
        pinger = asyncio.create_task(keepalive(node))
        if on_ready is not None:
            on_ready(node)
        try:
            yield {"node": node}
        finally:
            pinger.cancel()
            await node.stop()

    return Starlette(routes=routes, exception_handlers=error_handlers, lifespan=lifespan)


def run(settings: Settings, log_config: dict[str, Any], on_ready: Callable[[Node], None]) -> None:
    """Serve HTTP and WebSocket on one port until SIGTERM or SIGINT."""
    config = uvicorn.Config(
        create_app(settings, on_ready),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws=Connection,
        lifespan="on",
        log_config=log_config,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
