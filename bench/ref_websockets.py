"""Reference server: raw ``websockets`` + ``broadcast()``, fed by Redis pub/sub.

This is what a competent engineer writes with the ``websockets`` library when
asked for "WebSocket fan-out of a Redis channel" in about a hundred lines, so
the fan-out benchmark can put Herald's numbers next to it in the same run:

- the library's asyncio server (``websockets.asyncio.server.serve``) with
  permessage-deflate off (``compression=None``, as Herald does not compress)
  and the other settings at their defaults;
- ONE redis-py asyncio pub/sub connection for the whole process, with a
  reference count per channel: one ``SUBSCRIBE`` while a channel has local
  subscribers, ``UNSUBSCRIBE`` when the last one leaves or disconnects;
- one reader task that hands every Redis message, unchanged, to
  ``websockets.asyncio.server.broadcast()``: the library's own fan-out, which
  writes one copy per connection synchronously, with no per-subscriber
  ``await`` and no backpressure (a slow client's buffer just grows).

It speaks the smallest subset of Herald's ``herald.json`` protocol that the
load generator needs (``connect``, ``subscribe``, ``ping``; no auth, no
history) and forwards what is published on Redis channel NAME, which is
already a complete ``message`` frame, to the subscribers of NAME.
``subscribed`` is answered only once Redis has confirmed the ``SUBSCRIBE``,
so whatever is published after a client sees it reaches that client.
``GET /healthz`` answers 200 for readiness probes.

Usage: python bench/ref_websockets.py --port P --redis redis://127.0.0.1:R/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Sequence
from typing import Any

import uvloop
from redis.asyncio import Redis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

HOST = "127.0.0.1"
SUBPROTOCOL = Subprotocol("herald.json")


class Hub:
    """Channel -> local subscribers, mirrored onto one Redis pub/sub connection."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pubsub = redis.pubsub()
        self.channels: dict[str, set[ServerConnection]] = {}
        self.joined: dict[ServerConnection, set[str]] = {}
        # One future per SUBSCRIBE sent, resolved by the reader on Redis's confirmation.
        self.confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self.listening = asyncio.Event()

    async def subscribe(self, channel: str, ws: ServerConnection) -> None:
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

    async def leave(self, ws: ServerConnection) -> None:
        """Drop a connection everywhere; UNSUBSCRIBE channels nobody here wants anymore."""
        for channel in self.joined.pop(ws, set()):
            members = self.channels[channel]
            members.discard(ws)
            if not members:
                del self.channels[channel]
                await self.pubsub.unsubscribe(channel)

    async def run(self) -> None:
        """The reader: every Redis message goes to ``broadcast()`` as it is."""
        while True:
            # listen() returns when nothing is subscribed; wait for the next SUBSCRIBE.
            await self.listening.wait()
            async for message in self.pubsub.listen():
                kind, channel = message["type"], message["channel"]
                if kind == "message":
                    broadcast(self.channels.get(channel, ()), message["data"])
                elif kind == "subscribe" and (waiting := self.confirmations.get(channel)):
                    waiting.pop(0).set_result(None)
                    if not waiting:
                        del self.confirmations[channel]
            if not self.pubsub.subscribed:
                self.listening.clear()


async def reply_to(raw: str | bytes, ws: ServerConnection, hub: Hub) -> dict[str, Any]:
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


async def handler(ws: ServerConnection, hub: Hub) -> None:
    """One client connection: answer its requests in order; leave the hub at the end."""
    try:
        async for raw in ws:
            await ws.send(json.dumps(await reply_to(raw, ws, hub)))
    finally:
        await hub.leave(ws)


def select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``herald.json`` if the client offers it; no subprotocol otherwise (not an error)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def healthz(ws: ServerConnection, request: Request) -> Response | None:
    """Answer ``GET /healthz`` over plain HTTP; everything else goes on to the upgrade."""
    return ws.respond(200, "ok\n") if request.path == "/healthz" else None


async def main(port: int, redis_url: str) -> int:
    """Serve until SIGTERM/SIGINT (0) or until the Redis reader fails (1)."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.ping()
    hub = Hub(redis)
    reader = asyncio.create_task(hub.run())
    async with serve(
        lambda ws: handler(ws, hub),
        HOST,
        port,
        compression=None,
        select_subprotocol=select_subprotocol,
        process_request=healthz,
    ) as server:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.close)
        closed = asyncio.create_task(server.wait_closed())
        await asyncio.wait([reader, closed], return_when=asyncio.FIRST_COMPLETED)
    failed = reader.done() and not reader.cancelled() and reader.exception() is not None
    if failed:
        logging.error("Redis reader failed", exc_info=reader.exception())
    reader.cancel()
    await hub.pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
    await redis.aclose()
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reference server: websockets + broadcast()")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    raise SystemExit(uvloop.run(main(args.port, args.redis)))
