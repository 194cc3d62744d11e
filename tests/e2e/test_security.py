"""Secrets stay secret and tenants stay apart, checked against a real Redis and real logs.

One server on its own Redis, logging at debug level; the tests make every kind
of secret there is (app keys, channel keys, device keys, user tokens), then
read everything Redis holds and every log line for them.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.e2e.conftest import open_client, open_socket
from tests.support import RedisProcess, ServerProcess, scaled, start_redis, start_server

# One event loop for the module: the tenants fixture's HTTP client lives across its tests.
pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

ADMIN_KEY = f"operator-{secrets.token_urlsafe(18)}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """The module's own Redis: everything in it was written by the server below."""
    proc = start_redis(tmp_path_factory.mktemp("security-redis"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, store: RedisProcess
) -> Iterator[ServerProcess]:
    """Two workers on ``store``, logging everything."""
    proc = start_server(
        tmp_path_factory.mktemp("security"),
        "--redis",
        store.url,
        "--workers",
        "2",
        "--log-level",
        "debug",
        key=ADMIN_KEY,
    )
    yield proc
    proc.stop()


class Tenant:
    """One app and what its admin made: a channel, a message, a device, keys and a token."""

    def __init__(self, http: httpx.AsyncClient, name: str, admin_key: str) -> None:
        self.http = http
        self.name = name
        self.admin_key = admin_key
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        self.secrets: list[str] = [admin_key]
        self.channel = f"{name}-chan"
        self.message_id = ""
        self.device_id = ""
        self.key_id = ""
        self.ref = ""
        self.connection_key = ""
        self.token = ""

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.http.request(method, path, json=body, headers=self.headers)

    async def populate(self) -> None:
        created = await self.call("POST", "/v1/channels", {"name": self.channel})
        assert created.status_code == 201, created.text
        keys = created.json()["data"]["keys"]
        self.ref = keys["ref"]
        self.secrets += list(keys.values())
        published = await self.call("POST", f"/v1/channels/{self.channel}/publish", {"payload": 1})
        self.message_id = published.json()["data"]["id"]
        key = (await self.call("POST", "/v1/keys", {"scopes": ["publish"]})).json()["data"]
        self.key_id = key["id"]
        self.secrets.append(key["key"])
        device = {"address": f"{self.name}-toy", "platform": "toy"}
        registered = (await self.call("POST", "/v1/devices", {"device": device})).json()["data"]
        self.device_id = registered["device_id"]
        self.connection_key = registered["connection_key"]
        self.secrets.append(self.connection_key)
        await self.call(
            "POST", f"/v1/channels/{self.channel}/subscribers", {"device_id": self.device_id}
        )
        token = await self.call("POST", "/v1/tokens", {"user_id": "ann"})
        self.token = token.json()["data"]["token"]
        self.secrets.append(self.token)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tenants(server: ServerProcess) -> AsyncIterator[tuple[Tenant, Tenant]]:
    """Apps ``a`` and ``b``, each populated, and a connection made with every secret."""
    async with httpx.AsyncClient(base_url=server.url, timeout=scaled(10), trust_env=False) as http:
        made = []
        for name in (f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"):
            app = await http.post("/v1/apps", json={"name": name}, headers=server.headers)
            assert app.status_code == 201, app.text
            tenant = Tenant(http, name, app.json()["data"]["admin_key"]["key"])
            await tenant.populate()
            made.append(tenant)
        a, b = made
        # Use every secret once, and a wrong one, so that the logs had their chance.
        for secret in a.secrets:
            field = {a.connection_key: "connection_key", a.token: "token"}.get(secret, "key")
            async with open_socket(server) as client:
                await client.send({"op": "connect", "id": 1, field: secret})
                await client.recv()
        async with open_socket(server) as client:
            await client.send({"op": "connect", "id": 1, "key": "hk_not-a-key"})
            await client.recv()
        yield a, b


async def _everything_in(store: RedisProcess) -> bytes:
    """Every key name and value Redis holds, as one blob."""
    # Any: redis-py types its answers as bytes | str whatever the connection decodes.
    client: Any = aioredis.from_url(store.url)
    blob = bytearray()
    try:
        async for name in client.scan_iter(count=1000):
            blob += name
            kind = (await client.type(name)).decode()
            if kind == "string":
                blob += await client.get(name) or b""
            elif kind == "hash":
                for field, value in (await client.hgetall(name)).items():
                    blob += field + value
            elif kind == "set":
                blob += b"".join(await client.smembers(name))
            elif kind == "zset":
                blob += b"".join(await client.zrange(name, 0, -1))
            elif kind == "list":
                blob += b"".join(await client.lrange(name, 0, -1))
            elif kind == "stream":
                for entry_id, fields in await client.xrange(name):
                    blob += entry_id + b"".join(k + v for k, v in fields.items())
    finally:
        await client.aclose()
    return bytes(blob)


async def test_redis_holds_no_secret(
    tenants: tuple[Tenant, Tenant], store: RedisProcess, server: ServerProcess
) -> None:
    blob = await _everything_in(store)
    assert b"herald:" in blob  # the dump did read Herald's records
    secrets_made = [ADMIN_KEY, *tenants[0].secrets, *tenants[1].secrets]
    assert len(secrets_made) == 15
    for secret in secrets_made:
        assert secret.encode() not in blob, f"a key is stored in the clear: {secret[:6]}…"


async def test_no_secret_reaches_the_logs(
    tenants: tuple[Tenant, Tenant], server: ServerProcess
) -> None:
    log = server.log()
    assert "DEBUG" in log or "debug" in log.lower()  # the server did log at debug level
    for secret in [ADMIN_KEY, "hk_not-a-key", *tenants[0].secrets, *tenants[1].secrets]:
        assert secret not in log, f"a secret is in the logs: {secret[:6]}…"


async def test_another_apps_resources_are_not_found(tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    # Each of a's resources, asked for with b's admin key, next to a name that exists
    # nowhere: the answers must be the same, byte for byte.
    requests: list[tuple[str, str, str, Any]] = [
        ("GET", f"/v1/channels/{a.channel}", "/v1/channels/nowhere-x", None),
        ("PATCH", f"/v1/channels/{a.channel}", "/v1/channels/nowhere-x", {"description": "x"}),
        ("PUT", f"/v1/channels/{a.channel}", "/v1/channels/nowhere-x", {"description": "x"}),
        ("DELETE", f"/v1/channels/{a.channel}", "/v1/channels/nowhere-x", None),
        (
            "POST",
            f"/v1/channels/{a.channel}/publish",
            "/v1/channels/nowhere-x/publish",
            {"payload": 1},
        ),
        ("GET", f"/v1/channels/{a.channel}/history", "/v1/channels/nowhere-x/history", None),
        (
            "GET",
            f"/v1/channels/{a.channel}/messages/{a.message_id}",
            f"/v1/channels/nowhere-x/messages/{a.message_id}",
            None,
        ),
        (
            "GET",
            f"/v1/channels/{a.channel}/subscribers",
            "/v1/channels/nowhere-x/subscribers",
            None,
        ),
        (
            "POST",
            f"/v1/channels/{a.channel}/subscribers",
            "/v1/channels/nowhere-x/subscribers",
            {"device_id": a.device_id},
        ),
        (
            "DELETE",
            f"/v1/channels/{a.channel}/subscribers",
            "/v1/channels/nowhere-x/subscribers",
            {"device_id": a.device_id},
        ),
        ("GET", f"/v1/devices/{a.device_id}", "/v1/devices/dev_nowhere", None),
        (
            "POST",
            f"/v1/devices/{a.device_id}/commands",
            "/v1/devices/dev_nowhere/commands",
            {"payload": 1},
        ),
        (
            "POST",
            f"/v1/devices/chref:{a.ref}/commands",
            "/v1/devices/chref:nowhere/commands",
            {"payload": 1},
        ),
        ("DELETE", f"/v1/keys/{a.key_id}", "/v1/keys/key_nowhere", None),
    ]
    for method, theirs, nowhere, body in requests:
        answer = await b.call(method, theirs, body)
        control = await b.call(method, nowhere, body)
        assert answer.status_code == 404, (method, theirs, answer.text)
        assert answer.content == control.content, (method, theirs)
    for path, body in [
        ("/v1/devices/tags", {"audience": {"device_id": a.device_id}, "add": {"g": ["t"]}}),
        ("/v1/devices/uninstall", {"device_id": a.device_id}),
        ("/v1/devices/uninstall", {"address": f"{a.name}-toy", "platform": "toy"}),
    ]:
        answer = await b.call("POST", path, body)
        assert answer.status_code == 404, (path, answer.text)
    # Nothing of a's was touched by any of it.
    assert (await a.call("GET", f"/v1/devices/{a.device_id}")).json()["data"]["tags"] == {}
    channel = (await a.call("GET", f"/v1/channels/{a.channel}")).json()["data"]
    assert (channel["is_inactive"], channel["description"]) == (False, "")
    assert len((await a.call("GET", f"/v1/channels/{a.channel}/subscribers")).json()["data"]) == 1
    listed = {c["name"] for c in (await b.call("GET", "/v1/channels")).json()["data"]}
    assert a.channel not in listed


async def test_another_apps_channel_cannot_be_subscribed(
    tenants: tuple[Tenant, Tenant], server: ServerProcess
) -> None:
    a, b = tenants
    async with open_client(server, key=b.admin_key) as client:
        theirs = await client.request({"op": "subscribe", "id": 1, "channel": a.channel})
        nowhere = await client.request({"op": "subscribe", "id": 1, "channel": "nowhere-x"})
        assert theirs == nowhere
        assert theirs["code"] == "not_found"
