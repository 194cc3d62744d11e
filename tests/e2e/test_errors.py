"""Misbehaving WebSocket clients: bad credentials, bad frames, late connects, huge frames.

Each test runs on a server with a short connect timeout and a small frame
limit, next to a bystander that is subscribed to a channel of its own: the
bystander must receive every message published while the misbehaving client
is dealt with, and the server must keep answering ``/healthz``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.e2e.conftest import JSON, MSGPACK, Api, WSClient, open_api, open_client, open_socket
from tests.support import ServerProcess, scaled, start_server

CONNECT_TIMEOUT = 0.5
MAX_FRAME_BYTES = 1024
UNAUTHORIZED = 4001
BAD_FRAME = 4000
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009
_ONE_CREDENTIAL = "connect needs exactly one of key, token, connection_key"
_EMPTY_KEY = "key must be a non-empty string"


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with a 0.5 s connect timeout and a 1 KiB frame limit."""
    proc = start_server(
        tmp_path_factory.mktemp("strict"),
        env={
            "HERALD_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
            "HERALD_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
        },
    )
    yield proc
    proc.stop()


class Bystander:
    """A well-behaved subscriber and the ids published to it so far."""

    def __init__(self, client: WSClient, api: Api, channel: str) -> None:
        self.client = client
        self.api = api
        self.channel = channel
        self.expected: list[str] = []

    async def publish(self, count: int = 2) -> None:
        """Publish ``count`` messages to the bystander's channel over HTTP."""
        self.expected += await self.api.publish_many(self.channel, count)

    async def verify(self) -> None:
        """It received exactly what was published, and the server is healthy."""
        assert await self.client.message_ids(len(self.expected)) == self.expected
        await self.client.assert_idle()
        assert await self.api.healthy()


@pytest.fixture
async def bystander(strict_server: ServerProcess, channel_name: str) -> AsyncIterator[Bystander]:
    """A subscriber on the strict server, with one message already delivered."""
    async with open_api(strict_server) as api, open_client(strict_server) as client:
        await api.create_channel(channel_name)
        await client.subscribe(channel_name)
        watcher = Bystander(client, api, channel_name)
        await watcher.publish(1)
        yield watcher


def _error(frame: dict[str, Any], code: str, request_id: object = None) -> str:
    """Assert ``frame`` is an ``error`` with ``code`` (and ``id``); return its detail."""
    assert frame["op"] == "error", frame
    assert frame["code"] == code, frame
    assert frame.get("id") == request_id, frame
    detail = frame["detail"]
    assert isinstance(detail, str)
    return detail


@pytest.mark.parametrize(
    "encoding", [pytest.param(JSON, id="json"), pytest.param(MSGPACK, id="msgpack")]
)
async def test_wrong_key_closes_4001(
    strict_server: ServerProcess, bystander: Bystander, encoding: str
) -> None:
    async with open_socket(strict_server, encoding) as client:
        answer = await client.request({"op": "connect", "id": "c", "key": "hk_not-a-key"})
        assert answer == {
            "op": "error",
            "id": "c",
            "code": "unauthorized",
            "detail": "invalid credentials",
        }
        await bystander.publish()
        assert await client.close_code() == UNAUTHORIZED
    await bystander.publish()
    await bystander.verify()


@pytest.mark.parametrize(
    ("connect", "detail"),
    [
        pytest.param({"op": "connect", "id": "c"}, _ONE_CREDENTIAL, id="no-credential"),
        pytest.param(
            {"op": "connect", "id": "c", "key": "k", "token": "t"},
            _ONE_CREDENTIAL,
            id="two-credentials",
        ),
        pytest.param({"op": "connect", "id": "c", "key": ""}, _EMPTY_KEY, id="empty-key"),
        pytest.param({"op": "connect", "id": "c", "key": 12345}, _EMPTY_KEY, id="number-key"),
    ],
)
async def test_connect_without_one_credential_closes_4001(
    strict_server: ServerProcess, bystander: Bystander, connect: dict[str, Any], detail: str
) -> None:
    async with open_socket(strict_server) as client:
        answer = await client.request(connect)
        assert _error(answer, "unauthorized", "c") == detail
        await bystander.publish()
        assert await client.close_code() == UNAUTHORIZED
    await bystander.verify()


@pytest.mark.parametrize(
    "first",
    [
        pytest.param({"op": "ping", "id": 1}, id="ping"),
        pytest.param({"op": "subscribe", "id": 1, "channel": "anything"}, id="subscribe"),
        pytest.param({"op": "publish", "id": 1, "channel": "anything", "payload": 1}, id="publish"),
    ],
)
async def test_first_frame_other_than_connect_closes_4001(
    strict_server: ServerProcess, bystander: Bystander, first: dict[str, Any]
) -> None:
    async with open_socket(strict_server) as client:
        answer = await client.request(first)
        assert _error(answer, "unauthorized", 1) == "the first frame must be connect"
        assert await client.close_code() == UNAUTHORIZED
    await bystander.publish()
    await bystander.verify()


async def test_no_connect_in_time_closes_4001(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    started = time.monotonic()
    async with open_socket(strict_server) as client:
        await bystander.publish()
        answer = await client.recv(timeout=CONNECT_TIMEOUT + 5)
        assert _error(answer, "unauthorized") == "no connect frame in time"
        assert await client.close_code() == UNAUTHORIZED
    # Not before the timeout (and the bystander, connected earlier, was not cut off).
    assert time.monotonic() - started >= CONNECT_TIMEOUT * 0.9
    await bystander.publish()
    await bystander.verify()


async def test_bad_frames_close_4000_on_the_third_in_a_row(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    async with open_client(strict_server) as client:
        await client.send_raw("{not json")
        detail = _error(await client.recv(), "bad_frame")
        assert detail.startswith("JSON parse error")
        await bystander.publish()
        answer = await client.request({"op": "frobnicate", "id": "f"})
        assert answer == {
            "op": "error",
            "id": "f",
            "code": "bad_frame",
            "detail": "unknown op 'frobnicate'",
            "path": "op",
        }
        await bystander.publish()
        answer = await client.request({"id": "g"})
        assert answer == {
            "op": "error",
            "id": "g",
            "code": "bad_frame",
            "detail": "op is required",
            "path": "op",
        }
        assert await client.close_code() == BAD_FRAME
    await bystander.publish()
    await bystander.verify()


async def test_a_good_frame_resets_the_bad_frame_streak(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    async with open_client(strict_server) as client:
        for _ in range(2):
            await client.send_raw("[1, 2")
            _error(await client.recv(), "bad_frame")
            await client.send_raw(b"binary on a text subprotocol")
            assert _error(await client.recv(), "bad_frame") == "herald.json expects text frames"
            await bystander.publish(1)
            # A good frame in between: the streak starts again from zero.
            await client.assert_idle()
        await client.send_raw("[]")
        assert _error(await client.recv(), "bad_frame") == "a frame must be an object"
        await client.send_raw("null")
        _error(await client.recv(), "bad_frame")
        await client.send_raw('{"op": "nope"}')
        _error(await client.recv(), "bad_frame")
        assert await client.close_code() == BAD_FRAME
    await bystander.verify()


async def test_bad_msgpack_frames_close_4000(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    async with open_client(strict_server, MSGPACK) as client:
        await client.send_raw(b"\xc1")
        assert _error(await client.recv(), "bad_frame").startswith("MessagePack parse error")
        await client.send_raw('{"op": "ping"}')
        assert _error(await client.recv(), "bad_frame") == "herald.msgpack expects binary frames"
        await bystander.publish()
        await client.send({"op": 5, "id": 9})
        _error(await client.recv(), "bad_frame", 9)
        assert await client.close_code() == BAD_FRAME
    await bystander.verify()


async def test_request_errors_do_not_count_as_bad_frames(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    async with open_client(strict_server) as client:
        for n in range(5):
            answer = await client.request(
                {"op": "subscribe", "id": n, "channel": "no-such-channel"}
            )
            assert _error(answer, "not_found", n) == "Not found"
        await bystander.publish()
        await client.assert_idle()
    await bystander.verify()


async def test_text_frame_that_is_not_utf8_closes_1007(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    async with open_client(strict_server) as client:
        # websockets' client checks nothing it sends: a raw text frame with bad bytes.
        await client.ws.send(b'{"op": "ping", "id": "\xff\xfe"}', text=True)
        assert await client.close_code() == INVALID_DATA
    await bystander.publish()
    await bystander.verify()
    assert "Traceback" not in strict_server.log()


async def test_frame_over_the_limit_closes_1009(
    strict_server: ServerProcess, bystander: Bystander
) -> None:
    async with open_client(strict_server) as client:
        # Just under the limit is fine.
        padded = {"op": "ping", "id": "big", "pad": "x" * (MAX_FRAME_BYTES - 100)}
        assert await client.request(padded) == {"op": "pong", "id": "big"}
        await bystander.publish()
        await client.send_raw("x" * 2000)
        assert await client.close_code() == MESSAGE_TOO_BIG
    await bystander.publish()
    await bystander.verify()


@pytest.mark.parametrize("path", ["/", "/v1/connect/extra", "/v1/channels", "/nowhere"])
async def test_handshake_on_another_path_is_rejected_with_404(
    strict_server: ServerProcess, bystander: Bystander, path: str
) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            f"ws://127.0.0.1:{strict_server.port}{path}",
            subprotocols=None,
            proxy=None,
            open_timeout=scaled(5),
        ):
            pass
    assert info.value.response.status_code == 404
    await bystander.publish()
    await bystander.verify()
