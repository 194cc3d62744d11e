"""Apps, app keys, user tokens and the channel ACLs they meet, against a real server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import open_socket
from tests.support import RedisProcess, ServerProcess, scaled, start_server


def _as(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def _new_key(http: httpx.Client, *scopes: str, headers: dict[str, str] | None = None) -> str:
    response = http.post("/v1/keys", json={"scopes": list(scopes), "name": "t"}, headers=headers)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert set(data) == {"id", "key", "scopes", "name", "created_at"}
    assert data["scopes"] == list(scopes)
    key: str = data["key"]
    return key


def _token(http: httpx.Client, user: str, ttl: int = 600) -> str:
    response = http.post("/v1/tokens", json={"user_id": user, "ttl": ttl})
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["user_id"] == user
    token: str = data["token"]
    return token


def _channel(http: httpx.Client, name: str, **fields: Any) -> None:
    response = http.post("/v1/channels", json={"name": name, **fields})
    assert response.status_code == 201, response.text


def test_keys_are_shown_once_listed_without_secret_and_die_when_deleted(
    http: httpx.Client, channel_name: str
) -> None:
    _channel(http, channel_name)
    key = _new_key(http, "publish")
    response = http.post(
        f"/v1/channels/{channel_name}/publish", json={"payload": 1}, headers=_as(key)
    )
    assert response.status_code == 201
    assert response.json()["data"]["author"]["type"] == "key"
    listed = http.get("/v1/keys").json()["data"]
    mine = [k for k in listed if k["id"] == response.json()["data"]["author"]["id"]]
    assert len(mine) == 1
    assert "key" not in mine[0]
    assert key not in http.get("/v1/keys").text
    deleted = http.delete(f"/v1/keys/{mine[0]['id']}")
    assert deleted.status_code == 200
    again = http.post(f"/v1/channels/{channel_name}/publish", json={"payload": 2}, headers=_as(key))
    assert again.status_code == 401
    assert http.delete(f"/v1/keys/{mine[0]['id']}").status_code == 404
    assert http.delete("/v1/keys/bootstrap").status_code == 409


def test_scopes_limit_what_a_key_may_do(http: httpx.Client, channel_name: str) -> None:
    _channel(http, channel_name)
    publisher = _new_key(http, "publish")
    reader = _new_key(http, "subscribe")
    create = http.post("/v1/channels", json={"name": f"{channel_name}-x"}, headers=_as(publisher))
    assert create.status_code == 403
    assert "admin" in create.json()["detail"]
    assert (
        http.post("/v1/keys", json={"scopes": ["admin"]}, headers=_as(publisher)).status_code == 403
    )
    publish = http.post(
        f"/v1/channels/{channel_name}/publish", json={"payload": 1}, headers=_as(reader)
    )
    assert publish.status_code == 403
    history = http.get(f"/v1/channels/{channel_name}/history", headers=_as(reader))
    assert history.status_code == 200
    assert (
        http.get(f"/v1/channels/{channel_name}/history", headers=_as(publisher)).status_code == 403
    )
    bad = http.post("/v1/keys", json={"scopes": ["root"]})
    assert bad.status_code == 400
    assert bad.json()["path"] == "scopes"


def test_apps_isolate_tenants(http: httpx.Client, channel_name: str) -> None:
    app = f"app-{channel_name}"[:128]
    created = http.post("/v1/apps", json={"name": app})
    assert created.status_code == 201, created.text
    data = created.json()["data"]
    assert data["name"] == app
    other = data["admin_key"]["key"]
    assert http.post("/v1/apps", json={"name": app}).status_code == 409
    assert app in [a["name"] for a in http.get("/v1/apps").json()["data"]]
    # Only the operator key sees or makes apps.
    assert http.get("/v1/apps", headers=_as(other)).status_code == 403
    assert http.post("/v1/apps", json={"name": f"{app}2"}, headers=_as(other)).status_code == 403
    # Same channel name, different channels; neither app sees the other's.
    _channel(http, channel_name, description="in default")
    missing = http.get(f"/v1/channels/{channel_name}", headers=_as(other))
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not found", "code": "not_found"}
    publish = http.post(
        f"/v1/channels/{channel_name}/publish", json={"payload": 1}, headers=_as(other)
    )
    assert publish.status_code == 404
    mine = http.post(
        "/v1/channels", json={"name": channel_name, "description": "in b"}, headers=_as(other)
    )
    assert mine.status_code == 201
    assert http.get(f"/v1/channels/{channel_name}").json()["data"]["description"] == "in default"
    assert (
        http.get(f"/v1/channels/{channel_name}", headers=_as(other)).json()["data"]["description"]
        == "in b"
    )


def test_user_tokens_follow_the_channel_acls(http: httpx.Client, channel_name: str) -> None:
    private = f"{channel_name}-private"
    _channel(http, private, readers={"public": False, "user_ids": ["ann"]})
    _channel(http, channel_name, custom_publish=True, writers={"user_ids": ["ann"]})
    ann, bob = _token(http, "ann"), _token(http, "bob")
    assert http.get(f"/v1/channels/{private}/history", headers=_as(ann)).status_code == 200
    denied = http.get(f"/v1/channels/{private}/history", headers=_as(bob))
    assert denied.status_code == 403
    published = http.post(
        f"/v1/channels/{channel_name}/publish", json={"payload": "hi"}, headers=_as(ann)
    )
    assert published.status_code == 201
    assert published.json()["data"]["author"] == {"type": "user", "id": "ann"}
    refused = http.post(
        f"/v1/channels/{channel_name}/publish", json={"payload": "hi"}, headers=_as(bob)
    )
    assert refused.status_code == 403
    # custom_publish off: no user may publish, whatever the writers ACL says.
    assert (
        http.post(
            f"/v1/channels/{private}/publish", json={"payload": 1}, headers=_as(ann)
        ).status_code
        == 403
    )
    # A user creates a channel and owns it.
    own = http.post("/v1/channels", json={"name": f"{channel_name}-own"}, headers=_as(bob))
    assert own.status_code == 201
    assert own.json()["data"]["owner"] == {"type": "user", "id": "bob"}
    # Users mint nothing.
    assert http.post("/v1/tokens", json={"user_id": "x"}, headers=_as(ann)).status_code == 403
    assert http.post("/v1/keys", json={"scopes": ["admin"]}, headers=_as(ann)).status_code == 403


def test_bad_and_expired_tokens_are_401(http: httpx.Client, channel_name: str) -> None:
    _channel(http, channel_name)
    token = _token(http, "carl", ttl=1)
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:-2]}AA"
    assert http.get(f"/v1/channels/{channel_name}", headers=_as(forged)).status_code == 401
    assert http.get(f"/v1/channels/{channel_name}", headers=_as("a.b.c")).status_code == 401
    assert http.post("/v1/tokens", json={"user_id": ""}).json()["path"] == "user_id"
    assert http.post("/v1/tokens", json={"user_id": "x", "ttl": 0}).json()["path"] == "ttl"
    # Expiry is a matter of the clock: wait it out.
    time.sleep(scaled(2.1))
    expired = http.get(f"/v1/channels/{channel_name}", headers=_as(token))
    assert expired.status_code == 401
    assert expired.json()["detail"] == "token expired"


async def test_a_browser_connects_with_a_token(server: ServerProcess, channel_name: str) -> None:
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers, trust_env=False
    ) as http:
        await http.post(
            "/v1/channels", json={"name": channel_name, "readers": {"user_ids": ["dee"]}}
        )
        dee = (await http.post("/v1/tokens", json={"user_id": "dee"})).json()["data"]["token"]
        eve = (await http.post("/v1/tokens", json={"user_id": "eve"})).json()["data"]["token"]
        async with open_socket(server) as client:
            answer = await client.request({"op": "connect", "id": 1, "token": dee})
            assert answer["op"] == "connected"
            await client.subscribe(channel_name)
            await http.post(f"/v1/channels/{channel_name}/publish", json={"payload": "x"})
            [message] = await client.messages(1)
            assert message["payload"] == "x"
        async with open_socket(server) as client:
            assert (await client.request({"op": "connect", "id": 1, "token": eve}))["op"] == (
                "connected"
            )
            refused = await client.request({"op": "subscribe", "id": 2, "channel": channel_name})
            assert refused["op"] == "error"
            assert refused["code"] == "forbidden"
        async with open_socket(server) as client:
            await client.send({"op": "connect", "id": 1, "token": "x.y.z"})
            assert (await client.recv())["code"] == "unauthorized"
            assert await client.close_code() == 4001


async def test_a_deleted_key_stops_on_every_worker_at_once(
    tmp_path: Path, fresh_redis: RedisProcess
) -> None:
    server = start_server(tmp_path, "--redis", fresh_redis.url, "--workers", "2")
    try:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, trust_env=False
        ) as http:
            response = await http.post("/v1/keys", json={"scopes": ["subscribe"]})
            key, key_id = response.json()["data"]["key"], response.json()["data"]["id"]
            # Warm the key into both workers' caches: many requests, spread by the kernel.
            for _ in range(40):
                assert (await http.get("/v1/channels", headers=_as(key))).status_code == 200
            assert (await http.delete(f"/v1/keys/{key_id}")).status_code == 200
            statuses = await asyncio.gather(
                *(http.get("/v1/channels", headers=_as(key)) for _ in range(40))
            )
            assert {r.status_code for r in statuses} == {401}
    finally:
        server.stop()


def test_channel_keys_work_on_their_channel_only(http: httpx.Client, channel_name: str) -> None:
    created = http.post("/v1/channels", json={"name": channel_name})
    assert created.status_code == 201
    keys = created.json()["data"]["keys"]
    assert set(keys) == {"admin_key", "subscriber_key", "ref"}
    assert len(set(keys.values())) == 3
    other = f"{channel_name}-other"
    _channel(http, other)
    # Shown once: neither the channel nor the key listing gives them back.
    assert "keys" not in http.get(f"/v1/channels/{channel_name}").json()["data"]
    listing = http.get("/v1/keys").text
    assert not any(key in listing for key in keys.values())
    assert not any(k["scopes"][0] in keys for k in http.get("/v1/keys").json()["data"])

    url = f"/v1/channels/{channel_name}"
    ref, sub, admin = _as(keys["ref"]), _as(keys["subscriber_key"]), _as(keys["admin_key"])
    assert http.post(f"{url}/publish", json={"payload": 1}, headers=ref).status_code == 201
    assert http.get(f"{url}/history", headers=ref).status_code == 403
    assert http.post(f"{url}/publish", json={"payload": 1}, headers=sub).status_code == 403
    assert http.get(f"{url}/history", headers=sub).status_code == 200
    assert http.patch(url, json={"description": "x"}, headers=sub).status_code == 403
    assert http.patch(url, json={"description": "x"}, headers=admin).status_code == 200
    # Another channel of the same app: nothing.
    for credential in (ref, sub, admin):
        assert (
            http.post(
                f"/v1/channels/{other}/publish", json={"payload": 1}, headers=credential
            ).status_code
            == 403
        )
        assert http.get(f"/v1/channels/{other}/history", headers=credential).status_code == 403
        assert (
            http.post("/v1/channels", json={"name": f"{other}-x"}, headers=credential).status_code
            == 403
        )
        assert http.post("/v1/tokens", json={"user_id": "u"}, headers=credential).status_code == 403
    assert http.delete(url, headers=admin).status_code == 200
