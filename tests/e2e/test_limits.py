"""Each configurable limit, tried at its edge on a server started with small ones."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from tests.e2e.conftest import JSON, open_api, open_client, open_socket
from tests.support import ServerProcess, scaled, start_server, wait_until

TOO_MANY_CONNECTIONS = 4009
LIMITS = {
    "HERALD_PUBLISH_RATE": "0.2",  # one publish every 5 s: no test is fast enough to refill
    "HERALD_MAX_CONNECTIONS_PER_IP": "3",
    "HERALD_ALLOWED_ORIGINS": "https://good.example, https://also.example",
    "HERALD_MAX_PENDING_COMMANDS": "2",
    "HERALD_MAX_SUBSCRIPTIONS": "2",
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A memory-engine server with every limit small."""
    server = start_server(tmp_path_factory.mktemp("limits"), env=LIMITS)
    yield server
    server.stop()


async def _key(server: ServerProcess, *scopes: str) -> str:
    async with open_api(server) as api:
        response = await api.http.post("/v1/keys", json={"scopes": list(scopes)})
    assert response.status_code == 201, response.text
    key: str = response.json()["data"]["key"]
    return key


async def _post(server: ServerProcess, key: str, path: str, body: Any) -> httpx.Response:
    async with open_api(server) as api:
        return await api.http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


async def _publish(server: ServerProcess, key: str, channel: str) -> httpx.Response:
    return await _post(server, key, f"/v1/channels/{channel}/publish", {"payload": 1})


async def test_publish_rate_per_credential_answers_429_with_retry_after(
    limited: ServerProcess, channel_name: str
) -> None:
    async with open_api(limited) as api:
        await api.create_channel(channel_name)
    first, second = await _key(limited, "publish"), await _key(limited, "publish")
    assert (await _publish(limited, first, channel_name)).status_code == 201
    refused = await _publish(limited, first, channel_name)
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 5
    # The bucket is the credential's: another key still may.
    assert (await _publish(limited, second, channel_name)).status_code == 201
    # A WebSocket publish is counted the same way, and the socket stays open.
    async with open_client(limited, key=first) as client:
        answer = await client.request(
            {"op": "publish", "id": 7, "channel": channel_name, "payload": 2}
        )
        assert (answer["op"], answer["id"], answer["code"]) == ("error", 7, "rate_limited")
        await client.assert_idle()


async def test_a_batch_goes_through_on_a_full_bucket_and_leaves_it_in_debt(
    limited: ServerProcess, channel_name: str
) -> None:
    async with open_api(limited) as api:
        await api.create_channel(channel_name)
    key = await _key(limited, "publish")
    items = [{"channel": channel_name, "payload": n} for n in range(10)]
    batch = await _post(limited, key, "/v1/publish", items)
    assert batch.status_code == 200, batch.text
    assert [item["status"] for item in batch.json()["data"]] == [201] * 10
    refused = await _publish(limited, key, channel_name)
    assert refused.status_code == 429
    # Ten messages at 0.2 a second: about 50 s before the next one.
    assert int(refused.headers["retry-after"]) >= 40


async def test_connections_per_address_past_the_limit_close_4009(limited: ServerProcess) -> None:
    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(open_client(limited)) for _ in range(3)]
        async with open_socket(limited) as extra:
            error = await extra.recv()
            assert (error["op"], error["code"]) == ("error", "too_many_connections")
            assert await extra.close_code() == TOO_MANY_CONNECTIONS
        for client in held:
            await client.assert_idle()
        await held[0].ws.close()

        async def room_again() -> bool:
            async with open_socket(limited) as client:
                answer = await client.request({"op": "connect", "id": 1, "key": limited.key})
                return bool(answer["op"] == "connected")

        await wait_until(room_again)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://good.example", True),
        ("https://also.example", True),
        (None, True),
        ("https://evil.example", False),
        ("https://good.example.evil", False),
        ("null", False),
    ],
)
async def test_browser_origins_outside_allowed_origins_get_403(
    limited: ServerProcess, origin: str | None, allowed: bool
) -> None:
    async def handshake() -> None:
        async with connect(
            limited.ws_url,
            subprotocols=[Subprotocol(JSON)],
            origin=Origin(origin) if origin else None,
            proxy=None,
            open_timeout=scaled(5),
        ) as ws:
            await ws.send(json.dumps({"op": "connect", "id": 1, "key": limited.key}))
            assert '"connected"' in str(await asyncio.wait_for(ws.recv(), scaled(5)))

    if allowed:
        await handshake()
    else:
        with pytest.raises(InvalidStatus) as info:
            await handshake()
        assert info.value.response.status_code == 403


async def test_subscriptions_per_connection(limited: ServerProcess, channel_name: str) -> None:
    names = [f"{channel_name}-{n}" for n in range(3)]
    async with open_api(limited) as api:
        for name in names:
            await api.create_channel(name)
    async with open_client(limited) as client:
        for name in names[:2]:
            await client.subscribe(name)
        refused = await client.request({"op": "subscribe", "id": "third", "channel": names[2]})
        assert (refused["op"], refused["code"]) == ("error", "too_many_subscriptions")
        await client.send({"op": "unsubscribe", "id": "u", "channel": names[0]})
        assert (await client.recv())["op"] == "unsubscribed"
        await client.subscribe(names[2])


async def test_pending_commands_per_device(limited: ServerProcess) -> None:
    async with open_api(limited) as api:
        registered = await api.http.post(
            "/v1/devices",
            json={"device": {"address": f"a-{secrets.token_hex(4)}", "platform": "toy"}},
        )
        device_id = registered.json()["data"]["device_id"]
        key = registered.json()["data"]["connection_key"]
        async with open_socket(limited) as device:
            answer = await device.request({"op": "connect", "id": 1, "connection_key": key})
            assert answer["op"] == "connected"
            url = f"/v1/devices/{device_id}/commands"
            waiting = [
                asyncio.create_task(api.http.post(url, json={"payload": n, "timeout_ms": 20_000}))
                for n in range(2)
            ]
            commands = [await device.recv() for _ in waiting]
            refused = await api.http.post(url, json={"payload": 3, "timeout_ms": 20_000})
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "too_many_pending_commands"
            # Answering one makes room for the next.
            first = commands[0]
            await device.send({"op": "reply", "command_id": first["command_id"], "payload": "ok"})
            assert (await waiting[0]).json()["data"]["reply"] == "ok"
            third = asyncio.create_task(api.http.post(url, json={"payload": 4}))
            command = await device.recv()
            assert command["payload"] == 4
            await device.send({"op": "reply", "command_id": command["command_id"], "payload": 4})
            assert (await third).status_code == 200
            await device.send(
                {"op": "reply", "command_id": commands[1]["command_id"], "payload": "late"}
            )
            assert (await waiting[1]).status_code == 200
