"""Users' persistent subscriptions: owners follow what they make, connects resume them."""

from __future__ import annotations

from typing import Any

from tests.e2e.conftest import Api, WSClient, open_socket
from tests.support import ServerProcess


async def _token(api: Api, user: str) -> str:
    response = await api.http.post("/v1/tokens", json={"user_id": user})
    token: str = response.json()["data"]["token"]
    return token


async def _as_user(api: Api, token: str, path: str) -> dict[str, Any]:
    response = await api.http.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def _connect(client: WSClient, token: str) -> None:
    assert (await client.request({"op": "connect", "id": 1, "token": token}))["op"] == "connected"


async def test_owner_and_persistent_subscribers_are_resumed_on_connect(
    server: ServerProcess, api: Api, channel_name: str
) -> None:
    ann, bea = await _token(api, "ann"), await _token(api, "bea")
    created = await api.http.post(
        "/v1/channels",
        json={"name": channel_name},
        headers={"Authorization": f"Bearer {ann}"},
    )
    assert created.status_code == 201
    url = f"/v1/channels/{channel_name}"
    view = await _as_user(api, ann, url)
    assert (view["you_subscribed"], view["counts"]["subscribers"]) == (True, 1)
    assert (await _as_user(api, bea, url))["you_subscribed"] is False

    # Bea follows the channel for good from one connection...
    async with open_socket(server) as client:
        await _connect(client, bea)
        answer = await client.request(
            {"op": "subscribe", "id": "p", "channel": channel_name, "persist": True}
        )
        assert answer["op"] == "subscribed"
    view = await _as_user(api, bea, url)
    assert (view["you_subscribed"], view["counts"]["subscribers"]) == (True, 2)

    # ...and each new connection of hers (and of the owner) is subscribed at once.
    for token in (ann, bea):
        async with open_socket(server) as client:
            await _connect(client, token)
            resumed = await client.recv()
            assert resumed["op"] == "subscribed"
            assert resumed["channel"] == channel_name
            assert "id" not in resumed or resumed["id"] is None
            message_id = await api.publish(channel_name, "hello")
            assert await client.message_ids(1) == [message_id]

    # Unsubscribing with persist ends it.
    async with open_socket(server) as client:
        await _connect(client, bea)
        await client.recv()  # resumed
        answer = await client.request(
            {"op": "unsubscribe", "id": "u", "channel": channel_name, "persist": True}
        )
        assert answer["op"] == "unsubscribed"
    assert (await _as_user(api, bea, url))["you_subscribed"] is False
    async with open_socket(server) as client:
        await _connect(client, bea)
        await client.assert_idle()  # nothing resumed

    # Closing the channel drops its persistent subscribers.
    assert (await api.http.delete(url)).status_code == 200
    assert (await api.http.get(url)).json()["data"]["counts"]["subscribers"] == 0
    async with open_socket(server) as client:
        await _connect(client, ann)
        await client.assert_idle()


async def test_persist_needs_a_user(server: ServerProcess, api: Api, channel_name: str) -> None:
    await api.create_channel(channel_name)
    async with open_socket(server) as client:
        await client.request({"op": "connect", "id": 1, "key": server.key})
        answer = await client.request(
            {"op": "subscribe", "id": "p", "channel": channel_name, "persist": True}
        )
        assert (answer["op"], answer["code"], answer["path"]) == ("error", "bad_request", "persist")
