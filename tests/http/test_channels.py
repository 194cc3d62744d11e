"""The channel routes of the HTTP API, plus what every route shares: auth, bodies, errors.

Runs against a real ``herald serve``; asserts exact statuses and bodies.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgpack
import pytest

from tests.support import ServerProcess, scaled

MSGPACK = "application/msgpack"
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
OWNER = {"type": "key", "id": "bootstrap"}
DEFAULT_ACL = {"public": False, "any_user": False, "user_ids": [], "immutable": False}


@pytest.fixture(scope="module")
def anonymous(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client on the shared server without credentials."""
    with httpx.Client(base_url=server.url, timeout=scaled(10), trust_env=False) as client:
        yield client


def _error(response: httpx.Response, status: int, code: str, path: str | None = None) -> str:
    """Assert an error answer: its status, JSON body ``{detail, code, path?}``; its detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    expected_keys = {"detail", "code"} | ({"path"} if path is not None else set())
    assert set(body) == expected_keys, body
    assert body["code"] == code
    if path is not None:
        assert body["path"] == path
    detail: str = body["detail"]
    return detail


def test_create_answers_201_with_the_whole_channel(http: httpx.Client, channel_name: str) -> None:
    before = datetime.now(UTC)
    annotations = [{"type": "color", "value": "red"}, {"type": "size", "value": {"w": 3}}]
    response = http.post(
        "/v1/channels",
        json={"name": channel_name, "description": "kitchen lights", "annotations": annotations},
    )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/channels/{channel_name}"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"data", "meta"}
    assert body["meta"] == {"code": 201}
    channel = body["data"]
    # The channel's keys come with this answer only.
    keys = channel.pop("keys")
    assert set(keys) == {"admin_key", "subscriber_key", "ref"}
    assert channel == {
        "name": channel_name,
        "id": channel["id"],
        "description": "kitchen lights",
        "type": "default",
        "custom_publish": False,
        "readers": {**DEFAULT_ACL, "public": True},
        "writers": DEFAULT_ACL,
        "editors": DEFAULT_ACL,
        "annotations": annotations,
        "history_size": 100,
        "history_ttl": None,
        "idle_timeout": None,
        "owner": OWNER,
        "is_inactive": False,
        "created_at": channel["created_at"],
        "counts": {"messages": 0, "subscribers": 0, "connections": 0},
    }
    assert isinstance(channel["id"], str)
    assert re.fullmatch(r"[0-9a-f]{16}", channel["id"])
    assert CREATED_AT.fullmatch(channel["created_at"])
    created = datetime.fromisoformat(channel["created_at"])
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)
    # The channel reads back the same.
    again = http.get(f"/v1/channels/{channel_name}")
    assert again.status_code == 200
    assert again.json() == {"data": channel, "meta": {"code": 200}}


def test_create_with_every_setting(http: httpx.Client, channel_name: str) -> None:
    response = http.post(
        "/v1/channels",
        json={
            "name": channel_name,
            "type": "separate_rooms",
            "custom_publish": True,
            "readers": {"public": False, "user_ids": ["u1", "u1", "u2"]},
            "writers": {"any_user": True, "immutable": True},
            "history_size": 100_000,
            "history_ttl": 3600,
            "idle_timeout": 60,
        },
    )
    assert response.status_code == 201, response.text
    channel = response.json()["data"]
    assert channel["type"] == "separate_rooms"
    assert channel["custom_publish"] is True
    assert channel["readers"] == {**DEFAULT_ACL, "user_ids": ["u1", "u2"]}
    assert channel["writers"] == {**DEFAULT_ACL, "any_user": True, "immutable": True}
    assert channel["history_size"] == 100_000
    assert channel["history_ttl"] == 3600
    assert channel["idle_timeout"] == 60


def test_duplicate_name_is_409(http: httpx.Client, channel_name: str) -> None:
    assert http.post("/v1/channels", json={"name": channel_name}).status_code == 201
    response = http.post("/v1/channels", json={"name": channel_name, "description": "other"})
    detail = _error(response, 409, "conflict", "name")
    assert channel_name in detail
    # The first channel is untouched.
    assert http.get(f"/v1/channels/{channel_name}").json()["data"]["description"] == ""


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({"name": None}, "name", id="null-name"),
        pytest.param({"name": ""}, "name", id="empty-name"),
        pytest.param({"name": "has space"}, "name", id="space"),
        pytest.param({"name": "a/b"}, "name", id="slash"),
        pytest.param({"name": "x" * 129}, "name", id="129-chars"),
        pytest.param({"name": 12}, "name", id="number"),
        pytest.param({"type": "fanout"}, "type", id="bad-type"),
        pytest.param({"history_size": 0}, "history_size", id="history-size-0"),
        pytest.param({"history_size": 100_001}, "history_size", id="history-size-100001"),
        pytest.param({"history_size": "10"}, "history_size", id="history-size-string"),
        pytest.param({"history_size": True}, "history_size", id="history-size-bool"),
        pytest.param({"history_ttl": -1}, "history_ttl", id="negative-ttl"),
        pytest.param({"colour": "red"}, "colour", id="unknown-field"),
        pytest.param({"custom_publish": "yes"}, "custom_publish", id="custom-publish"),
        pytest.param({"readers": {"everyone": True}}, "readers.everyone", id="acl-field"),
        pytest.param({"annotations": {"type": "a"}}, "annotations", id="annotations-object"),
        pytest.param({"annotations": [{"type": "a"}]}, "annotations[0]", id="annotation-shape"),
    ],
)
def test_invalid_channel_is_400_naming_the_field(
    http: httpx.Client, channel_name: str, body: dict[str, Any], path: str
) -> None:
    payload = {"name": channel_name, **body}
    response = http.post("/v1/channels", json=payload)
    _error(response, 400, "bad_request", path)
    # Nothing was created.
    if isinstance(payload["name"], str) and path != "name":
        assert http.get(f"/v1/channels/{channel_name}").status_code == 404


def test_missing_name_is_400(http: httpx.Client) -> None:
    response = http.post("/v1/channels", json={"description": "no name"})
    _error(response, 400, "bad_request", "name")


def test_the_largest_channel_name_is_accepted(http: httpx.Client) -> None:
    name = f"{uuid.uuid4().hex}.:_-" + "z" * 92
    assert len(name) == 128
    response = http.post("/v1/channels", json={"name": name})
    assert response.status_code == 201, response.text
    assert response.json()["data"]["name"] == name


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"name": "a",}', b"\xff\xfe"])
def test_unparsable_json_body_is_400(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/channels", content=body, headers={"Content-Type": "application/json"})
    assert _error(response, 400, "bad_request").startswith("JSON parse error")


def test_non_object_body_is_400(http: httpx.Client) -> None:
    response = http.post("/v1/channels", json=["name"])
    _error(response, 400, "bad_request")


@pytest.mark.parametrize("body", [b"\xc1", b"\x82\xa4name", b"\x81\xa4name\xa1a\xff"])
def test_unparsable_msgpack_body_is_400(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/channels", content=body, headers={"Content-Type": MSGPACK})
    assert _error(response, 400, "bad_request").startswith("MessagePack parse error")


def test_msgpack_request_and_response(http: httpx.Client, channel_name: str) -> None:
    body = msgpack.packb({"name": channel_name, "history_size": 7}, use_bin_type=True)
    response = http.post(
        "/v1/channels", content=body, headers={"Content-Type": MSGPACK, "Accept": MSGPACK}
    )
    assert response.status_code == 201
    assert response.headers["content-type"] == MSGPACK
    answer = msgpack.unpackb(response.content, raw=False)
    assert answer["meta"] == {"code": 201}
    assert answer["data"]["name"] == channel_name
    assert answer["data"]["history_size"] == 7
    # The same channel over JSON.
    as_json = http.get(f"/v1/channels/{channel_name}").json()["data"]
    assert {**as_json, "keys": answer["data"]["keys"]} == answer["data"]
    # Errors are msgpack too when msgpack is accepted.
    duplicate = http.post(
        "/v1/channels", content=body, headers={"Content-Type": MSGPACK, "Accept": MSGPACK}
    )
    assert duplicate.status_code == 409
    assert duplicate.headers["content-type"] == MSGPACK
    error = msgpack.unpackb(duplicate.content, raw=False)
    assert error["code"] == "conflict"
    assert error["path"] == "name"


def test_no_credentials_is_401(anonymous: httpx.Client) -> None:
    for response in (
        anonymous.get("/v1/channels"),
        anonymous.post("/v1/channels", json={"name": "never-created"}),
        anonymous.get("/v1/channels/never-created"),
    ):
        detail = _error(response, 401, "unauthorized")
        assert "Bearer" in detail
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Authorization": "Bearer hk_wrong"}, id="wrong-bearer"),
        pytest.param({"X-API-Key": "hk_wrong"}, id="wrong-x-api-key"),
        pytest.param({"Authorization": "Bearer"}, id="empty-bearer"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic"),
    ],
)
def test_wrong_credentials_are_401(anonymous: httpx.Client, headers: dict[str, str]) -> None:
    response = anonymous.get("/v1/channels", headers=headers)
    _error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_creates_nothing(
    anonymous: httpx.Client, http: httpx.Client, channel_name: str
) -> None:
    response = anonymous.post(
        "/v1/channels", json={"name": channel_name}, headers={"Authorization": "Bearer nope"}
    )
    assert _error(response, 401, "unauthorized") == "invalid credentials"
    assert http.get(f"/v1/channels/{channel_name}").status_code == 404


def test_x_api_key_works_like_bearer(
    anonymous: httpx.Client, server: ServerProcess, channel_name: str
) -> None:
    created = anonymous.post(
        "/v1/channels", json={"name": channel_name}, headers={"X-API-Key": server.key}
    )
    assert created.status_code == 201, created.text
    fetched = anonymous.get(f"/v1/channels/{channel_name}", headers={"X-API-Key": server.key})
    assert fetched.status_code == 200
    assert {**fetched.json()["data"], "keys": created.json()["data"]["keys"]} == created.json()[
        "data"
    ]
    lowercase = anonymous.get(
        f"/v1/channels/{channel_name}", headers={"Authorization": f"bearer {server.key}"}
    )
    assert lowercase.status_code == 200


def test_list_pages_through_every_channel_once(fresh_server: ServerProcess) -> None:
    prefix = f"page-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}-{suffix}" for suffix in ("g", "c", "a", "f", "b", "e", "d")]
    with httpx.Client(
        base_url=fresh_server.url, headers=fresh_server.headers, trust_env=False
    ) as http:
        for i, name in enumerate(names):
            kind = "separate_rooms" if i % 3 == 0 else "default"
            assert http.post("/v1/channels", json={"name": name, "type": kind}).status_code == 201
        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
            response = http.get("/v1/channels", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body["meta"]) == {"code", "next"}
            assert body["meta"]["code"] == 200
            pages.append([channel["name"] for channel in body["data"]])
            cursor = body["meta"]["next"]
            if cursor is None:
                break
            assert len(pages) < 10, pages
        assert [len(page) for page in pages] == [3, 3, 1]
        seen = [name for page in pages for name in page]
        assert seen == sorted(names)
        # One page of everything, and a filter by type.
        everything = http.get("/v1/channels").json()
        assert [c["name"] for c in everything["data"]] == sorted(names)
        assert everything["meta"]["next"] is None
        rooms = http.get("/v1/channels", params={"type": "separate_rooms"}).json()["data"]
        assert [c["name"] for c in rooms] == sorted(names[0::3])
        assert all(c["type"] == "separate_rooms" for c in rooms)


@pytest.mark.parametrize("limit", ["0", "201", "-1", "ten", ""])
def test_list_limit_out_of_range_is_400(http: httpx.Client, limit: str) -> None:
    response = http.get("/v1/channels", params={"limit": limit})
    _error(response, 400, "bad_request", "limit")


def test_list_limit_200_is_accepted(http: httpx.Client) -> None:
    response = http.get("/v1/channels", params={"limit": "200"})
    assert response.status_code == 200
    assert len(response.json()["data"]) <= 200


def test_list_bad_type_is_400(http: httpx.Client) -> None:
    _error(http.get("/v1/channels", params={"type": "fanout"}), 400, "bad_request", "type")


def test_unknown_channel_is_404(http: httpx.Client, channel_name: str) -> None:
    response = http.get(f"/v1/channels/{channel_name}")
    assert _error(response, 404, "not_found") == "Not found"


def test_unknown_route_is_404_json(http: httpx.Client) -> None:
    for path in ("/v1/nowhere", "/", "/v1/channels/a/b/c"):
        response = http.get(path)
        assert _error(response, 404, "not_found") == "Not found"


def test_wrong_method_is_405_json(http: httpx.Client) -> None:
    response = http.delete("/healthz")
    _error(response, 405, "method_not_allowed")


def test_healthz_and_readyz(anonymous: httpx.Client) -> None:
    health = anonymous.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"data": {"status": "ok"}, "meta": {"code": 200}}
    ready = anonymous.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"data": {"status": "ready"}, "meta": {"code": 200}}
