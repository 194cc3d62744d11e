"""Reference server: Starlette + uvicorn, fed by Redis pub/sub the encode/broadcaster way.

This is the usual ASGI answer to "WebSocket fan-out of a Redis channel", so
the fan-out benchmark can put Herald's numbers next to it in the same run:

- a Starlette app with one ``WebSocketRoute`` on ``/v1/connect``, served by
  uvicorn with uvloop, httptools, the websockets sans-I/O protocol and
  permessage-deflate off (Herald does not compress either);
- ONE redis-py asyncio pub/sub connection for the whole process, with a
  reference count per channel: one ``SUBSCRIBE`` while a channel has local
  subscribers, ``UNSUBSCRIBE`` when the last one leaves or disconnects;
- one reader task that, as encode/broadcaster's Redis backend and most
  hand-written Starlette fan-outs do, sends every Redis message to the
  channel's subscribers one after the other with
  ``await websocket.send_text(data)``. That per-subscriber ``await`` through
  the ASGI ``send`` callable is the point of this reference: each delivery
  pays for a coroutine call, an ASGI message and uvicorn's flow control, and
  one subscriber that cannot take more (its transport paused) stalls the
  fan-out for everyone after it. A subscriber whose send fails is dropped.

It speaks the smallest subset of Herald's ``herald.json`` protocol that the
load generator needs (``connect``, ``subscribe``, ``ping``; no auth, no
history) and forwards what is published on Redis channel NAME, which is
already a complete ``message`` frame, to the subscribers of NAME.
``subscribed`` is answered only once Redis has confirmed the ``SUBSCRIBE``,
so whatever is published after a client sees it reaches that client.
``GET /healthz`` answers 200 for readiness probes.

Usage: python bench/ref_starlette.py --port P --redis redis://127.0.0.1:R/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

HOST = "127.0.0.1"
SUBPROTOCOL = "herald.json"


class Hub:
    """Channel -> local subscribers, mirrored onto one Redis pub/sub connection."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pubsub = redis.pubsub()
        self.channels: dict[str, set[WebSocket]] = {}
        self.joined: dict[WebSocket, set[str]] = {}
        # One future per SUBSCRIBE sent, resolved by the reader on Redis's confirmation.
        self.confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self.listening = asyncio.Event()

    async def subscribe(self, channel: str, ws: WebSocket) -> None:
        """Add a local subscriber; SUBSCRIBE on Redis for the first one."""
        members = self.channels.setdefault(channel, set())
        if ws not in members:
            members.add(ws)
            self.joined.setdefault(ws, set()).add(channel)
            if len(members) == 1:
                future = asyncio.get_running_loop().create_future()
                self.confirmations.setdefault(channel, []).append(future)
                await self.pubsub.subscribe(channel)
                self.listening.set()
        if waiting := self.confirmations.get(channel):
            await asyncio.shield(waiting[-1])

    async def leave(self, ws: WebSocket) -> None:
        """Drop a connection everywhere; UNSUBSCRIBE channels nobody here wants anymore."""
        for channel in self.joined.pop(ws, set()):
            members = self.channels[channel]
            members.discard(ws)
            if not members:
                del self.channels[channel]
                await self.pubsub.unsubscribe(channel)

    async def run(self) -> None:
        """The reader: every Redis message is awaited into each subscriber in turn."""
        while True:
            # listen() returns when nothing is subscribed; wait for the next SUBSCRIBE.
            await self.listening.wait()
            async for message in self.pubsub.listen():
                kind, channel = message["type"], message["channel"]
                if kind == "message":
                    data: str = message["data"]
                    # A copy: subscribers come and go while this loop awaits.
                    for ws in list(self.channels.get(channel, ())):
                        try:
                            await ws.send_text(data)
                        except Exception:
                            await self.leave(ws)
                elif kind == "subscribe" and (waiting := self.confirmations.get(channel)):
                    waiting.pop(0).set_result(None)
                    if not waiting:
                        del self.confirmations[channel]
            if not self.pubsub.subscribed:
                self.listening.clear()


async def reply_to(raw: str, ws: WebSocket, hub: Hub) -> dict[str, Any]:
    """Decode one request, act on it, return the answer frame."""
    try:
        request = json.loads(raw)
        op, request_id = request.get("op"), request.get("id")
    except (ValueError, AttributeError):
        return {"op": "error", "code": "bad_request", "detail": "not a JSON object"}
    if op == "connect":
        return {"op": "connected", "id": request_id}
    if op == "ping":
        return {"op": "pong", "id": request_id}
    if op == "subscribe":
        channel = request.get("channel")
        if isinstance(channel, str) and channel:
            await hub.subscribe(channel, ws)
            return {"op": "subscribed", "id": request_id, "channel": channel}
    return {"op": "error", "id": request_id, "code": "bad_request", "detail": f"bad {op!r}"}


async def connect(ws: WebSocket) -> None:
    """One client connection: answer its requests in order; leave the hub at the end."""
    hub: Hub = ws.app.state.hub
    offered = ws.scope.get("subprotocols", [])
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    try:
        async for raw in ws.iter_text():
            await ws.send_text(json.dumps(await reply_to(raw, ws, hub)))
    finally:
        await hub.leave(ws)


async def healthz(request: Request) -> PlainTextResponse:
    """Readiness probe."""
    return PlainTextResponse("ok\n")


def make_app(redis_url: str, on_reader_done: Callable[[asyncio.Task[None]], None]) -> Starlette:
    """The app; its lifespan owns the Redis client and the reader task."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        await redis.ping()
        hub = app.state.hub = Hub(redis)
        reader = asyncio.create_task(hub.run())
        reader.add_done_callback(on_reader_done)
        try:
            yield
        finally:
            reader.cancel()
            await hub.pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await redis.aclose()

    return Starlette(
        routes=[WebSocketRoute("/v1/connect", connect), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def main() -> int:
    """Serve until SIGTERM/SIGINT (0) or until the Redis reader fails (1)."""
    parser = argparse.ArgumentParser(description="Reference server: Starlette + uvicorn")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    failed = False

    def on_reader_done(task: asyncio.Task[None]) -> None:
        # A dead Redis link cannot be served around: log it and stop.
        nonlocal failed
        if not task.cancelled():
            failed = True
            logging.error("Redis reader failed", exc_info=task.exception())
            server.should_exit = True

    server = uvicorn.Server(
        uvicorn.Config(
            make_app(args.redis, on_reader_done),
            host=HOST,
            port=args.port,
            loop="uvloop",
            http="httptools",
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    )

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again
    # for the handler that was there before it started: make that an exit 0.
    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(1 if failed else 0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
