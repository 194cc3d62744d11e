"""A small WebSocket client and HTTP helper for the end-to-end tests.

`WSClient` reads one frame at a time with a timeout and decodes it by the
negotiated subprotocol (text JSON or binary msgpack), so every test states
exactly which frames it expects, in which order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.support import RedisProcess, ServerProcess, scaled, start_server

__all__ = [
    "JSON",
    "MSGPACK",
    "Api",
    "Frame",
    "WSClient",
    "clients_on_distinct_workers",
    "open_api",
    "open_client",
    "open_socket",
]

JSON = "herald.json"
MSGPACK = "herald.msgpack"

Frame = dict[str, Any]
"""One decoded WebSocket frame."""

_request_ids = itertools.count(1)


class WSClient:
    """One WebSocket connection to Herald, speaking frames rather than bytes.

    Methods that wait take a ``timeout`` in seconds and scale it by
    ``HERALD_TEST_TIMEOUT_SCALE``, which a caller's own ``asyncio.timeout`` would not.
    """

    def __init__(self, ws: ClientConnection, encoding: str) -> None:
        self.ws = ws
        self.encoding = encoding
        self.connected: Frame = {}
        """The ``connected`` answer, once `open_client` has connected."""

    async def send(self, frame: Frame) -> None:
        """Encode ``frame`` as the subprotocol wants (text JSON or binary msgpack) and send it."""
        if self.encoding == MSGPACK:
            await self.ws.send(msgpack.packb(frame, use_bin_type=True))
        else:
            await self.ws.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        """Send one WebSocket message exactly as given."""
        await self.ws.send(data)

    async def recv(self, timeout: float = 5.0) -> Frame:  # noqa: ASYNC109
        """The next frame, decoded; fails if none arrives within ``timeout`` (scaled) seconds."""
        async with asyncio.timeout(scaled(timeout)):
            data = await self.ws.recv()
        if self.encoding == MSGPACK:
            assert isinstance(data, bytes), f"herald.msgpack sent a text frame: {data!r}"
            frame = msgpack.unpackb(data, raw=False)
        else:
            assert isinstance(data, str), f"herald.json sent a binary frame: {data!r}"
            frame = json.loads(data)
        assert isinstance(frame, dict), frame
        return frame

    async def request(self, frame: Frame) -> Frame:
        """Send a frame and return the next frame received (its answer)."""
        await self.send(frame)
        return await self.recv()

    async def subscribe(self, channel: str, **fields: Any) -> Frame:
        """Subscribe and return the ``subscribed`` answer (asserting that it is one)."""
        request_id = f"sub-{next(_request_ids)}"
        answer = await self.request(
            {"op": "subscribe", "id": request_id, "channel": channel, **fields}
        )
        assert answer["op"] == "subscribed", answer
        assert answer["id"] == request_id
        assert answer["channel"] == channel
        return answer

    async def messages(self, count: int, timeout: float = 10.0) -> list[Frame]:  # noqa: ASYNC109
        """The next ``count`` frames, each of which must be a ``message``."""
        frames: list[Frame] = []
        async with asyncio.timeout(scaled(timeout)):
            while len(frames) < count:
                frame = await self.recv(timeout)
                assert frame["op"] == "message", frame
                frames.append(frame)
        return frames

    async def message_ids(self, count: int, timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        """The ids of the next ``count`` frames, each of which must be a ``message``."""
        return [frame["id"] for frame in await self.messages(count, timeout)]

    async def assert_idle(self) -> None:
        """Prove nothing is queued for us: a ping's pong must be the very next frame.

        The server answers frames of one connection in order and queues every
        message it delivers before it reads our ping, so anything delivered
        before this call would arrive ahead of the pong.
        """
        request_id = f"idle-{next(_request_ids)}"
        assert await self.request({"op": "ping", "id": request_id}) == {
            "op": "pong",
            "id": request_id,
        }

    async def close_code(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """Wait for the server to close the connection (no frame may come first); its code."""
        try:
            frame = await self.recv(timeout)
        except ConnectionClosed as exc:
            received = exc.rcvd
        else:
            pytest.fail(f"expected the connection to close, received {frame!r}")
        assert received is not None, "the server closed the TCP link without a close frame"
        return received.code


@asynccontextmanager
async def open_socket(server: ServerProcess, encoding: str = JSON) -> AsyncIterator[WSClient]:
    """A WebSocket connection that has not sent ``connect`` yet."""
    async with connect(
        server.ws_url,
        subprotocols=[Subprotocol(encoding)],
        proxy=None,
        open_timeout=scaled(5),
        close_timeout=scaled(2),
    ) as ws:
        assert ws.subprotocol == encoding
        yield WSClient(ws, encoding)


@asynccontextmanager
async def open_client(
    server: ServerProcess, encoding: str = JSON, *, key: str | None = None
) -> AsyncIterator[WSClient]:
    """A WebSocket connection authenticated with ``key`` (the server's admin key by default)."""
    async with open_socket(server, encoding) as client:
        answer = await client.request({"op": "connect", "id": "hello", "key": key or server.key})
        assert answer["op"] == "connected", answer
        client.connected = answer
        yield client


class Api:
    """The HTTP calls the WebSocket tests need, asserting success."""

    def __init__(self, server: ServerProcess) -> None:
        self.http = httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=scaled(10), trust_env=False
        )

    async def create_channel(self, name: str, **fields: Any) -> Frame:
        """Create a channel; its API view."""
        response = await self.http.post("/v1/channels", json={"name": name, **fields})
        assert response.status_code == 201, response.text
        data: Frame = response.json()["data"]
        return data

    async def publish(self, channel: str, payload: Any, **fields: Any) -> str:
        """Publish one message; its id."""
        response = await self.http.post(
            f"/v1/channels/{channel}/publish", json={"payload": payload, **fields}
        )
        assert response.status_code == 201, response.text
        message_id: str = response.json()["data"]["id"]
        return message_id

    async def publish_many(self, channel: str, count: int, **fields: Any) -> list[str]:
        """Publish ``count`` messages one after another (payload ``{"n": i}``); their ids."""
        return [await self.publish(channel, {"n": i}, **fields) for i in range(count)]

    async def history_ids(self, channel: str, **params: str) -> list[str]:
        """The ids the history endpoint answers (limit 1000 unless given)."""
        response = await self.http.get(
            f"/v1/channels/{channel}/history", params={"limit": "1000", **params}
        )
        assert response.status_code == 200, response.text
        return [message["id"] for message in response.json()["data"]]

    async def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200."""
        return (await self.http.get("/healthz")).status_code == 200


@asynccontextmanager
async def open_api(server: ServerProcess) -> AsyncIterator[Api]:
    """An `Api` on ``server``, closed on exit."""
    api = Api(server)
    try:
        yield api
    finally:
        await api.http.aclose()


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[Api]:
    """An `Api` on the shared server."""
    async with open_api(server) as client:
        yield client


@pytest.fixture
def two_workers(tmp_path: Path, fresh_redis: RedisProcess) -> Iterator[ServerProcess]:
    """``herald serve --workers 2`` on the test's Redis."""
    server = start_server(tmp_path, "--redis", fresh_redis.url, "--workers", "2")
    yield server
    server.stop()


async def clients_on_distinct_workers(
    stack: AsyncExitStack, server: ServerProcess, count: int
) -> list[WSClient]:
    """Open connections until ``count`` of them sit on different worker processes.

    /healthz answers as soon as one worker is up, and the kernel picks the worker
    for each accept, so keep trying (for a while) until the others take some.
    """
    by_worker: dict[str, WSClient] = {}
    async with asyncio.timeout(scaled(20)):
        while len(by_worker) < count:
            async with AsyncExitStack() as attempt:
                client = await attempt.enter_async_context(open_client(server))
                worker = client.connected["server"]
                if worker not in by_worker:
                    by_worker[worker] = client
                    stack.push_async_exit(attempt.pop_all())
                    continue
            await asyncio.sleep(0.02)
    return list(by_worker.values())
