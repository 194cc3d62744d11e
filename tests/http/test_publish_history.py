"""Publishing over HTTP and reading history back, against a real ``herald serve``.

Covers the message object, id order, limits, rooms, the history query
parameters and the bound every channel's history keeps.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgpack
import pytest

from herald.models import offset_key
from tests.support import ServerProcess

MSGPACK = "application/msgpack"
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
MESSAGE_ID = re.compile(r"\d+-\d+")
AUTHOR = {"type": "key", "id": "bootstrap"}
MAX_PAYLOAD = 64 * 1024

Publish = Callable[..., dict[str, Any]]


def _create(http: httpx.Client, name: str, **fields: Any) -> None:
    response = http.post("/v1/channels", json={"name": name, **fields})
    assert response.status_code == 201, response.text


def _publish(http: httpx.Client, name: str, payload: Any, **fields: Any) -> dict[str, Any]:
    """Publish and return the message object (asserting the 201)."""
    response = http.post(f"/v1/channels/{name}/publish", json={"payload": payload, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["meta"] == {"code": 201}
    message: dict[str, Any] = body["data"]
    return message


def _ids(http: httpx.Client, name: str, n: int, **fields: Any) -> list[str]:
    return [_publish(http, name, {"n": i}, **fields)["id"] for i in range(n)]


def _history(http: httpx.Client, name: str, **params: str) -> list[str]:
    response = http.get(f"/v1/channels/{name}/history", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["meta"] == {"code": 200}
    return [message["id"] for message in body["data"]]


def _error(response: httpx.Response, status: int, code: str, path: str | None = None) -> str:
    """Assert an error answer: its status, JSON body ``{detail, code, path?}``; its detail."""
    assert response.status_code == status, response.text
    body = response.json()
    expected_keys = {"detail", "code"} | ({"path"} if path is not None else set())
    assert set(body) == expected_keys, body
    assert body["code"] == code
    if path is not None:
        assert body["path"] == path
    detail: str = body["detail"]
    return detail


def test_publish_answers_201_with_the_message(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    before = datetime.now(UTC)
    payload = {"text": "hi", "list": [1, 2.5, None, True, "é"], "nested": {"a": {}}}
    message = _publish(http, channel_name, payload, metadata={"trace": "t-1"})
    assert message == {
        "id": message["id"],
        "channel": channel_name,
        "room": "",
        "payload": payload,
        "author": AUTHOR,
        "created_at": message["created_at"],
        "action": "custom",
        "metadata": {"trace": "t-1"},
        "links": {"self": f"/v1/channels/{channel_name}/messages/{message['id']}"},
    }
    assert MESSAGE_ID.fullmatch(message["id"])
    assert CREATED_AT.fullmatch(message["created_at"])
    created = datetime.fromisoformat(message["created_at"])
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)
    # links.self is the same message.
    fetched = http.get(message["links"]["self"])
    assert fetched.status_code == 200
    assert fetched.json() == {"data": message, "meta": {"code": 200}}
    # The channel counts it.
    counts = http.get(f"/v1/channels/{channel_name}").json()["data"]["counts"]
    assert counts["messages"] == 1


def test_metadata_defaults_to_null(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    for payload in (None, 0, "text", [1], {"a": 1}):
        message = _publish(http, channel_name, payload)
        assert message["payload"] == payload
        assert message["metadata"] is None


def test_message_link_for_an_unknown_id_is_404(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    message = _publish(http, channel_name, 1)
    ms, _, seq = message["id"].partition("-")
    missing = http.get(f"/v1/channels/{channel_name}/messages/{ms}-{int(seq) + 1}")
    assert _error(missing, 404, "not_found") == "Not found"
    garbage = http.get(f"/v1/channels/{channel_name}/messages/latest")
    _error(garbage, 400, "bad_request", "id")


def test_ids_increase_strictly(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    ids = _ids(http, channel_name, 50)
    keys = [offset_key(i) for i in ids]
    assert all(a < b for a, b in itertools.pairwise(keys))
    assert _history(http, channel_name) == ids


def test_payload_limit(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    # A JSON string's encoding is its characters plus two quotes.
    largest = "x" * (MAX_PAYLOAD - 2)
    assert _publish(http, channel_name, largest)["payload"] == largest
    response = http.post(f"/v1/channels/{channel_name}/publish", json={"payload": largest + "x"})
    _error(response, 413, "payload_too_large", "payload")
    assert len(_history(http, channel_name)) == 1


def test_publish_body_errors(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    url = f"/v1/channels/{channel_name}/publish"
    _error(http.post(url, json={"room": None}), 400, "bad_request", "payload")
    _error(http.post(url, json={"payload": 1, "color": 2}), 400, "bad_request", "color")
    _error(http.post(url, json={"payload": 1, "metadata": [1]}), 400, "bad_request", "metadata")
    _error(http.post(url, json=[1]), 400, "bad_request")
    parse = http.post(url, content=b"{", headers={"Content-Type": "application/json"})
    assert _error(parse, 400, "bad_request").startswith("JSON parse error")
    assert _history(http, channel_name) == []


def test_publish_to_an_unknown_channel_is_404(http: httpx.Client, channel_name: str) -> None:
    response = http.post(f"/v1/channels/{channel_name}/publish", json={"payload": 1})
    assert _error(response, 404, "not_found") == "Not found"
    history = http.get(f"/v1/channels/{channel_name}/history")
    assert _error(history, 404, "not_found") == "Not found"


def test_publish_without_credentials_is_401(server: ServerProcess, channel_name: str) -> None:
    with httpx.Client(base_url=server.url, trust_env=False) as anonymous:
        response = anonymous.post(f"/v1/channels/{channel_name}/publish", json={"payload": 1})
        _error(response, 401, "unauthorized")
        response = anonymous.get(f"/v1/channels/{channel_name}/history")
        _error(response, 401, "unauthorized")


def test_msgpack_publish_and_history(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
    body = msgpack.packb({"payload": {"temp": 21.5, "ok": True}}, use_bin_type=True)
    response = http.post(f"/v1/channels/{channel_name}/publish", content=body, headers=headers)
    assert response.status_code == 201
    assert response.headers["content-type"] == MSGPACK
    message = msgpack.unpackb(response.content, raw=False)["data"]
    assert message["payload"] == {"temp": 21.5, "ok": True}
    history = http.get(f"/v1/channels/{channel_name}/history", headers={"Accept": MSGPACK})
    assert history.headers["content-type"] == MSGPACK
    assert msgpack.unpackb(history.content, raw=False)["data"] == [message]


def test_separate_rooms_need_a_room(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name, type="separate_rooms")
    url = f"/v1/channels/{channel_name}"
    _error(http.post(f"{url}/publish", json={"payload": 1}), 400, "bad_request", "room")
    _error(http.post(f"{url}/publish", json={"payload": 1, "room": ""}), 400, "bad_request", "room")
    bad_room = http.post(f"{url}/publish", json={"payload": 1, "room": "a b"})
    _error(bad_room, 400, "bad_request", "room")
    _error(http.get(f"{url}/history"), 400, "bad_request", "room")


def test_default_channel_rejects_a_room(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    url = f"/v1/channels/{channel_name}"
    response = http.post(f"{url}/publish", json={"payload": 1, "room": "kitchen"})
    _error(response, 400, "bad_request", "room")
    _error(http.get(f"{url}/history", params={"room": "kitchen"}), 400, "bad_request", "room")
    assert _history(http, channel_name) == []


def test_rooms_have_separate_histories(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name, type="separate_rooms")
    kitchen: list[str] = []
    hall: list[str] = []
    for i in range(6):
        room, ids = ("kitchen", kitchen) if i % 2 else ("hall", hall)
        message = _publish(http, channel_name, i, room=room)
        assert message["room"] == room
        ids.append(message["id"])
    assert _history(http, channel_name, room="kitchen") == kitchen
    assert _history(http, channel_name, room="hall") == hall
    assert _history(http, channel_name, room="attic") == []
    # A message's link names its room.
    link = f"/v1/channels/{channel_name}/messages/{kitchen[0]}"
    assert http.get(link, params={"room": "kitchen"}).status_code == 200
    # Ids are per room: the same id can exist in another room (published in the same
    # millisecond), so the room that surely lacks it is the empty one.
    assert http.get(link, params={"room": "attic"}).status_code == 404
    other = next((i for i in kitchen if i not in hall), None)
    if other is not None:
        elsewhere = f"/v1/channels/{channel_name}/messages/{other}"
        assert http.get(elsewhere, params={"room": "hall"}).status_code == 404


def test_history_since_until_limit_reverse(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    ids = _ids(http, channel_name, 10)
    full = http.get(f"/v1/channels/{channel_name}/history").json()["data"]
    assert [m["payload"] for m in full] == [{"n": i} for i in range(10)]
    assert [m["id"] for m in full] == ids
    assert _history(http, channel_name, since=ids[2]) == ids[3:]
    assert _history(http, channel_name, until=ids[7]) == ids[:7]
    assert _history(http, channel_name, since=ids[2], until=ids[7]) == ids[3:7]
    assert _history(http, channel_name, since=ids[-1]) == []
    assert _history(http, channel_name, since=ids[5], until=ids[5]) == []
    assert _history(http, channel_name, limit="4") == ids[:4]
    assert _history(http, channel_name, reverse="1") == ids[::-1]
    assert _history(http, channel_name, reverse="true", limit="3") == ids[:-4:-1]
    assert _history(http, channel_name, reverse="false", limit="3") == ids[:3]
    assert _history(http, channel_name, since=ids[2], limit="2") == ids[3:5]
    assert _history(http, channel_name, until=ids[7], reverse="1", limit="2") == [ids[6], ids[5]]
    assert _history(http, channel_name, since="0-0") == ids
    assert _history(http, channel_name, limit="1000") == ids


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"limit": "0"}, "limit", id="limit-0"),
        pytest.param({"limit": "1001"}, "limit", id="limit-1001"),
        pytest.param({"limit": "x"}, "limit", id="limit-word"),
        pytest.param({"since": "latest"}, "since", id="since-word"),
        pytest.param({"since": "12"}, "since", id="since-no-seq"),
        pytest.param({"until": "1-2-3"}, "until", id="until-shape"),
        pytest.param({"reverse": "maybe"}, "reverse", id="reverse-word"),
    ],
)
def test_history_bad_parameters_are_400(
    http: httpx.Client, channel_name: str, params: dict[str, str], path: str
) -> None:
    _create(http, channel_name)
    response = http.get(f"/v1/channels/{channel_name}/history", params=params)
    _error(response, 400, "bad_request", path)


def test_history_keeps_only_the_last_history_size(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name, history_size=5)
    ids = _ids(http, channel_name, 8)
    assert _history(http, channel_name) == ids[3:]
    assert _history(http, channel_name, reverse="1") == ids[:2:-1]
    # Trimmed messages are gone by id as well, retained ones are not.
    assert http.get(f"/v1/channels/{channel_name}/messages/{ids[0]}").status_code == 404
    assert http.get(f"/v1/channels/{channel_name}/messages/{ids[3]}").status_code == 200
    # The channel still counts every message published.
    assert http.get(f"/v1/channels/{channel_name}").json()["data"]["counts"]["messages"] == 8
