"""The permission matrix: every kind of credential by every action, public and private
channels, on both engines. Each cell asserts the exact status, error code or close code.

Channels are made by a user ("owner") with ``custom_publish`` on; ``listed`` is named by
every ACL of both; ``readers`` is immutable. A failing run lists every wrong cell.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.support import RedisProcess, ServerProcess, scaled, start_server

ACTIONS = (
    "create",
    "read",
    "list",
    "update",
    "update_immutable",
    "close",
    "publish_http",
    "publish_ws",
    "subscribe",
    "history",
)

# Expected result per credential: one value for both channels, or (public, private).
# HTTP actions give a status; "list" gives seen/hidden (or a status); WebSocket actions
# give ok, an error code, or the close code as a string.
UNAUTHORIZED = {a: 401 for a in ACTIONS} | {"publish_ws": "4001", "subscribe": "4001"}
EXPECTED: dict[str, dict[str, Any]] = {
    "admin": {
        "create": 201,
        "read": 200,
        "list": "seen",
        "update": 200,
        "update_immutable": 400,
        "close": 200,
        "publish_http": 201,
        "publish_ws": "ok",
        "subscribe": "ok",
        "history": 200,
    },
    "publish_key": {
        "create": 403,
        "read": 200,
        "list": "seen",
        "update": 403,
        "update_immutable": 403,
        "close": 403,
        "publish_http": 201,
        "publish_ws": "ok",
        "subscribe": "forbidden",
        "history": 403,
    },
    "subscribe_key": {
        "create": 403,
        "read": 200,
        "list": "seen",
        "update": 403,
        "update_immutable": 403,
        "close": 403,
        "publish_http": 403,
        "publish_ws": "forbidden",
        "subscribe": ("ok", "forbidden"),
        "history": (200, 403),
    },
    "owner": {
        "create": 201,
        "read": 200,
        "list": "seen",
        "update": 200,
        "update_immutable": 400,
        "close": 200,
        "publish_http": 201,
        "publish_ws": "ok",
        "subscribe": "ok",
        "history": 200,
    },
    "listed_user": {
        "create": 201,
        "read": 200,
        "list": "seen",
        "update": 200,
        "update_immutable": 400,
        "close": 200,
        "publish_http": 201,
        "publish_ws": "ok",
        "subscribe": "ok",
        "history": 200,
    },
    "other_user": {
        "create": 201,
        "read": (200, 403),
        "list": ("seen", "hidden"),
        "update": 403,
        "update_immutable": 403,
        "close": 403,
        "publish_http": 403,
        "publish_ws": "forbidden",
        "subscribe": ("ok", "forbidden"),
        "history": (200, 403),
    },
    "channel_admin_key": {
        "create": 403,
        "read": 200,
        "list": "seen",
        "update": 200,
        "update_immutable": 400,
        "close": 200,
        "publish_http": 201,
        "publish_ws": "ok",
        "subscribe": "ok",
        "history": 200,
    },
    "channel_subscriber_key": {
        "create": 403,
        "read": 200,
        "list": "seen",
        "update": 403,
        "update_immutable": 403,
        "close": 403,
        "publish_http": 403,
        "publish_ws": "forbidden",
        "subscribe": "ok",
        "history": 200,
    },
    "channel_ref": {
        "create": 403,
        "read": 403,
        "list": "hidden",
        "update": 403,
        "update_immutable": 403,
        "close": 403,
        "publish_http": 201,
        "publish_ws": "ok",
        "subscribe": "forbidden",
        "history": 403,
    },
    "expired_token": UNAUTHORIZED,
    "deleted_key": UNAUTHORIZED,
    "other_app_key": {
        "create": 201,
        "read": 404,
        "list": "hidden",
        "update": 404,
        "update_immutable": 404,
        "close": 404,
        "publish_http": 404,
        "publish_ws": "not_found",
        "subscribe": "not_found",
        "history": 404,
    },
    "nothing": UNAUTHORIZED,
}


@pytest.fixture(scope="module", params=["memory", "redis"])
def engine_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A Herald on each engine in turn."""
    extra: list[str] = []
    if request.param == "redis":
        redis: RedisProcess = request.getfixturevalue("redis_server")
        extra = ["--redis", redis.url]
    server = start_server(tmp_path_factory.mktemp(f"perm-{request.param}"), *extra)
    yield server
    server.stop()


@dataclass
class World:
    """The credentials of one server, and how to make the channels of one cell."""

    http: httpx.Client
    credentials: dict[str, str | None]
    names: Iterator[int]

    def channel(self, private: bool) -> tuple[str, dict[str, str]]:
        """A new channel made by ``owner``; its name and keys."""
        name = f"{'priv' if private else 'pub'}-{next(self.names)}-{time.monotonic_ns()}"
        readers = {"user_ids": ["listed"]} if private else {"public": True}
        body = {
            "name": name,
            "custom_publish": True,
            "readers": {**readers, "immutable": True},
            "writers": {"user_ids": ["listed"]},
            "editors": {"user_ids": ["listed"]},
        }
        response = self.http.post(
            "/v1/channels", json=body, headers=_auth(self.credentials["owner"])
        )
        assert response.status_code == 201, response.text
        keys: dict[str, str] = response.json()["data"]["keys"]
        return name, keys


def _auth(credential: str | None) -> dict[str, str]:
    return {} if credential is None else {"Authorization": f"Bearer {credential}"}


def _world(server: ServerProcess) -> World:
    http = httpx.Client(
        base_url=server.url, headers=server.headers, trust_env=False, timeout=scaled(10)
    )

    def key(*scopes: str) -> str:
        response = http.post("/v1/keys", json={"scopes": list(scopes)})
        assert response.status_code == 201, response.text
        value: str = response.json()["data"]["key"]
        return value

    def token(user: str, ttl: int = 3600) -> str:
        response = http.post("/v1/tokens", json={"user_id": user, "ttl": ttl})
        assert response.status_code == 201, response.text
        value: str = response.json()["data"]["token"]
        return value

    doomed = http.post("/v1/keys", json={"scopes": ["admin"]}).json()["data"]
    assert http.delete(f"/v1/keys/{doomed['id']}").status_code == 200
    other_app = http.post("/v1/apps", json={"name": f"other-{time.monotonic_ns()}"})
    assert other_app.status_code == 201, other_app.text
    expired = token("owner", ttl=1)
    credentials: dict[str, str | None] = {
        "admin": server.key,
        "publish_key": key("publish"),
        "subscribe_key": key("subscribe"),
        "owner": token("owner"),
        "listed_user": token("listed"),
        "other_user": token("other"),
        "expired_token": expired,
        "deleted_key": doomed["key"],
        "other_app_key": other_app.json()["data"]["admin_key"]["key"],
        "nothing": None,
    }
    time.sleep(scaled(2.1))  # let the one-second token expire
    return World(http, credentials, itertools.count())


def _status_or_visibility(action: str, response: httpx.Response, name: str) -> Any:
    if action == "list" and response.status_code == 200:
        names = [c["name"] for c in response.json()["data"]]
        return "seen" if name in names else "hidden"
    return response.status_code


async def _websocket(server: ServerProcess, credential: str | None, frame: dict[str, Any]) -> str:
    """Connect with the credential, send one frame; ok, the error code, or the close code."""
    connect_frame: dict[str, Any] = {"op": "connect", "id": 0}
    if credential is not None:
        connect_frame["token" if credential.count(".") == 2 else "key"] = credential
    async with connect(server.ws_url, subprotocols=[Subprotocol("herald.json")], proxy=None) as ws:
        await ws.send(json.dumps(connect_frame))
        try:
            answer = json.loads(await ws.recv())
            if answer["op"] != "connected":
                await ws.recv()  # the close follows the error
            await ws.send(json.dumps(frame))
            # Skip what the server sends unasked (a user's resumed subscriptions).
            reply = json.loads(await ws.recv())
            while reply.get("id") != frame["id"]:
                reply = json.loads(await ws.recv())
        except ConnectionClosed as closed:
            return str(closed.rcvd.code if closed.rcvd else "no close frame")
    if reply["op"] in ("published", "subscribed"):
        return "ok"
    return str(reply.get("code"))


async def _run_cell(
    server: ServerProcess, world: World, who: str, action: str, private: bool
) -> Any:
    name, keys = world.channel(private)
    channel_keys = {
        "channel_admin_key": keys["admin_key"],
        "channel_subscriber_key": keys["subscriber_key"],
        "channel_ref": keys["ref"],
    }
    credential = channel_keys.get(who, world.credentials.get(who))
    headers = _auth(credential)
    http = world.http
    url = f"/v1/channels/{name}"
    calls: dict[str, Callable[[], httpx.Response]] = {
        "create": lambda: http.post("/v1/channels", json={"name": f"new-{name}"}, headers=headers),
        "read": lambda: http.get(url, headers=headers),
        "list": lambda: http.get("/v1/channels", params={"limit": "200"}, headers=headers),
        "update": lambda: http.patch(url, json={"description": "changed"}, headers=headers),
        "update_immutable": lambda: http.patch(
            url, json={"readers": {"any_user": True}}, headers=headers
        ),
        "close": lambda: http.delete(url, headers=headers),
        "publish_http": lambda: http.post(f"{url}/publish", json={"payload": 1}, headers=headers),
        "history": lambda: http.get(f"{url}/history", headers=headers),
    }
    if "Authorization" not in headers:
        # No credential at all: the server key of the client must not leak in.
        for action_name in calls:
            calls[action_name] = _without_default_key(calls[action_name], http)
    if action == "publish_ws":
        return await _websocket(
            server, credential, {"op": "publish", "id": 1, "channel": name, "payload": 1}
        )
    if action == "subscribe":
        return await _websocket(server, credential, {"op": "subscribe", "id": 1, "channel": name})
    return _status_or_visibility(action, calls[action](), name)


def _without_default_key(
    call: Callable[[], httpx.Response], http: httpx.Client
) -> Callable[[], httpx.Response]:
    def bare() -> httpx.Response:
        saved = http.headers.pop("Authorization")
        try:
            return call()
        finally:
            http.headers["Authorization"] = saved

    return bare


async def test_permission_matrix(engine_server: ServerProcess) -> None:
    world = _world(engine_server)
    wrong = []
    try:
        for who, expectations in EXPECTED.items():
            for action in ACTIONS:
                for private in (False, True):
                    expected = expectations[action]
                    if isinstance(expected, tuple):
                        expected = expected[private]
                    got = await _run_cell(engine_server, world, who, action, private)
                    if got != expected:
                        kind = "private" if private else "public"
                        wrong.append(f"{who} x {action} on {kind}: expected {expected}, got {got}")
    finally:
        world.http.close()
    assert not wrong, "\n".join(wrong)


def test_every_credential_and_action_is_in_the_matrix() -> None:
    assert all(set(row) == set(ACTIONS) for row in EXPECTED.values())
    assert len(EXPECTED) == 13
