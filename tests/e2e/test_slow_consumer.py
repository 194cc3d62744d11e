"""A subscriber that stops reading is closed with 4008; the others never notice."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.e2e.conftest import JSON, WSClient, open_api, open_client
from tests.support import ServerProcess, start_server, wait_until

OUTBOX_LIMIT = 256 * 1024
SLOW_CONSUMER = 4008
PAYLOAD = "x" * 60_000


async def _close_code_after_draining(ws: ClientConnection) -> int:
    """Read until the server's close frame; its code."""
    with pytest.raises(ConnectionClosed) as closed:
        await _read_forever(ws)
    received = closed.value.rcvd
    assert received is not None, "closed without a close frame"
    return received.code


async def _read_forever(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


@pytest.fixture
def small_outbox_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server that closes a connection once 256 KiB wait unsent for it."""
    proc = start_server(tmp_path, env={"HERALD_OUTBOX_LIMIT_BYTES": str(OUTBOX_LIMIT)})
    yield proc
    proc.stop()


async def test_slow_subscriber_is_closed_4008_and_bystanders_get_everything(
    small_outbox_server: ServerProcess, channel_name: str
) -> None:
    server = small_outbox_server
    async with open_api(server) as api, open_client(server) as bystander:
        await api.create_channel(channel_name, history_size=2000)
        await bystander.subscribe(channel_name)
        # max_queue=1: once one message waits unread, the client stops reading the
        # socket, so the kernel buffers fill and the backlog lands in the server.
        async with connect(
            server.ws_url, subprotocols=[Subprotocol(JSON)], max_queue=1, proxy=None
        ) as slow:
            await slow.send(json.dumps({"op": "connect", "id": 1, "key": server.key}))
            await slow.send(json.dumps({"op": "subscribe", "id": 2, "channel": channel_name}))
            published: list[str] = []

            async def slow_one_closed() -> bool:
                if "slow consumer" in server.log():
                    return True
                if len(published) >= 1500:
                    pytest.fail("the slow subscriber was never closed")
                items = [{"channel": channel_name, "payload": PAYLOAD} for _ in range(20)]
                response = await api.http.post("/v1/publish", json=items)
                assert response.status_code == 200, response.text
                published.extend(result["data"]["id"] for result in response.json()["data"])
                # Keep the bystander reading as we go, as a live client would.
                assert await bystander.message_ids(20, timeout=20) == published[-20:]
                return False

            await wait_until(slow_one_closed, seconds=60, interval=0)
            # Reading again, the slow client drains what was already in flight and then
            # finds the close frame the server sent: 4008, "reconnect with since".
            assert await _close_code_after_draining(slow) == SLOW_CONSUMER
        # The bystander is still subscribed and still gets new messages.
        more = await api.publish_many(channel_name, 3)
        assert await bystander.message_ids(3) == more
        await bystander.assert_idle()


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def test_one_slow_subscriber_among_a_thousand_is_cut_at_the_limit(
    small_outbox_server: ServerProcess, channel_name: str
) -> None:
    server = small_outbox_server
    _raise_file_limit(4096)
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(open_api(server))
        await api.create_channel(channel_name, history_size=10)
        bystanders = []
        for _ in range(1000):
            client = await stack.enter_async_context(open_client(server))
            await client.subscribe(channel_name)
            bystanders.append(client)
        slow = await stack.enter_async_context(
            connect(server.ws_url, subprotocols=[Subprotocol(JSON)], max_queue=1, proxy=None)
        )
        await slow.send(json.dumps({"op": "connect", "id": 1, "key": server.key}))
        await slow.send(json.dumps({"op": "subscribe", "id": 2, "channel": channel_name}))

        published: list[str] = []
        received: list[list[str]] = [[] for _ in bystanders]

        async def read(index: int, client: WSClient, count: int) -> None:
            received[index].extend(await client.message_ids(count, timeout=60))

        while "slow consumer" not in server.log():
            assert len(published) < 400, "the slow subscriber was never closed"
            # Four 60 KB messages a round: each bystander reads them before the next
            # round, so none of them comes near the limit itself.
            items = [{"channel": channel_name, "payload": PAYLOAD} for _ in range(4)]
            response = await api.http.post("/v1/publish", json=items)
            assert response.status_code == 200, response.text
            published.extend(result["data"]["id"] for result in response.json()["data"])
            await asyncio.gather(*(read(i, c, 4) for i, c in enumerate(bystanders)))
        assert await _close_code_after_draining(slow) == SLOW_CONSUMER
        # Every bystander got every message, once, in order, and is still subscribed.
        assert all(ids == published for ids in received)
        assert "slow consumer" not in server.log().replace(_closing_line(server), "", 1)
        # The server held at most the limit and one round more for the slow client,
        # however much was published for it.
        unsent = int(_closing_line(server).split("(")[1].split()[0])
        assert OUTBOX_LIMIT < unsent <= OUTBOX_LIMIT + 4 * (len(PAYLOAD) + 200)
        more = await api.publish_many(channel_name, 2)
        for client in bystanders:
            assert await client.message_ids(2) == more


def _closing_line(server: ServerProcess) -> str:
    return next(line for line in server.log().splitlines() if "slow consumer" in line)
