"""Batch publish (``POST /v1/publish``) against a real ``herald serve``."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support import ServerProcess


def _create(http: httpx.Client, name: str, **fields: Any) -> None:
    response = http.post("/v1/channels", json={"name": name, **fields})
    assert response.status_code == 201, response.text


def _history_payloads(http: httpx.Client, name: str, **params: str) -> list[Any]:
    response = http.get(f"/v1/channels/{name}/history", params={"limit": "1000", **params})
    assert response.status_code == 200, response.text
    return [message["payload"] for message in response.json()["data"]]


def test_batch_publishes_every_item_in_order(http: httpx.Client, channel_name: str) -> None:
    other = f"{channel_name}-b"
    _create(http, channel_name, history_size=1000)
    _create(http, other)
    items = [{"channel": channel_name, "payload": n} for n in range(500)]
    items.insert(250, {"channel": other, "payload": "elsewhere", "metadata": {"k": "v"}})
    response = http.post("/v1/publish", json=items)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["meta"] == {"code": 200}
    results = body["data"]
    assert len(results) == 501
    assert all(result["status"] == 201 for result in results)
    assert results[250]["data"]["channel"] == other
    assert results[250]["data"]["metadata"] == {"k": "v"}
    published = [r["data"] for r in results if r["data"]["channel"] == channel_name]
    assert [m["payload"] for m in published] == list(range(500))
    assert _history_payloads(http, channel_name) == list(range(500))
    assert _history_payloads(http, other) == ["elsewhere"]


def test_batch_reports_failures_per_item(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    rooms = f"{channel_name}-rooms"
    _create(http, rooms, type="separate_rooms")
    items: list[Any] = [
        {"channel": channel_name, "payload": "first"},
        {"channel": f"{channel_name}-missing", "payload": "x"},
        {"channel": channel_name},
        "not an object",
        {"channel": channel_name, "payload": "x", "colour": "red"},
        {"channel": rooms, "payload": "no room"},
        {"channel": rooms, "payload": "in a room", "room": "r1"},
        {"channel": "bad name!", "payload": "x"},
        {"channel": channel_name, "payload": "x" * (64 * 1024 + 1)},
        {"channel": channel_name, "payload": "last"},
    ]
    response = http.post("/v1/publish", json=items)
    assert response.status_code == 200, response.text
    results = response.json()["data"]
    assert [r["status"] for r in results] == [201, 404, 400, 400, 400, 400, 201, 400, 413, 201]
    assert results[1]["error"] == {"detail": "Not found", "code": "not_found"}
    assert results[2]["error"]["path"] == "payload"
    assert results[4]["error"]["path"] == "colour"
    assert results[5]["error"]["path"] == "room"
    assert results[7]["error"]["path"] == "channel"
    assert results[6]["data"]["room"] == "r1"
    # The failures published nothing; the others went through, in order.
    assert _history_payloads(http, channel_name) == ["first", "last"]


def test_prefer_return_minimal_answers_ids_alone(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    items: list[Any] = [
        {"channel": channel_name, "payload": "x" * 100},
        {"channel": f"{channel_name}-missing", "payload": "x"},
        {"channel": channel_name, "payload": "y"},
    ]
    for prefer in ("return=minimal", "respond-async, RETURN = minimal; x=1"):
        response = http.post("/v1/publish", json=items, headers={"Prefer": prefer})
        assert response.status_code == 200, response.text
        assert response.headers["preference-applied"] == "return=minimal"
        results = response.json()["data"]
        assert [r["status"] for r in results] == [201, 404, 201]
        assert results[0] == {"status": 201, "data": {"id": results[0]["data"]["id"]}}
        assert results[1]["error"] == {"detail": "Not found", "code": "not_found"}
        newest = {"limit": "2", "reverse": "true"}
        history = http.get(f"/v1/channels/{channel_name}/history", params=newest)
        assert [m["id"] for m in history.json()["data"]] == [
            results[2]["data"]["id"],
            results[0]["data"]["id"],
        ]

    single = http.post(
        f"/v1/channels/{channel_name}/publish",
        json={"payload": "z"},
        headers={"Prefer": "return=minimal"},
    )
    assert single.status_code == 201, single.text
    assert single.headers["preference-applied"] == "return=minimal"
    assert list(single.json()["data"]) == ["id"]
    # Without the preference, the whole message, and no Preference-Applied.
    full = http.post("/v1/publish", json=items[:1], headers={"Prefer": "return=representation"})
    assert full.json()["data"][0]["data"]["payload"] == "x" * 100
    assert "preference-applied" not in full.headers


def test_batch_body_errors(http: httpx.Client) -> None:
    response = http.post("/v1/publish", json={"channel": "x", "payload": 1})
    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"
    response = http.post("/v1/publish", json=[{"channel": "x", "payload": n} for n in range(1001)])
    assert response.status_code == 413
    assert "1000" in response.json()["detail"]
    response = http.post("/v1/publish", content=b"[", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error")


def test_batch_needs_credentials(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/publish", json=[], trust_env=False)
    assert response.status_code == 401


def test_idempotency_key_makes_retries_safe(http: httpx.Client, channel_name: str) -> None:
    _create(http, channel_name)
    url = f"/v1/channels/{channel_name}/publish"
    first = http.post(url, json={"payload": "once"}, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 201
    retry = http.post(url, json={"payload": "once"}, headers={"Idempotency-Key": "order-1"})
    assert retry.status_code == 201
    assert retry.json()["data"] == first.json()["data"]
    other = http.post(url, json={"payload": "twice"}, headers={"Idempotency-Key": "order-2"})
    assert other.json()["data"]["id"] != first.json()["data"]["id"]
    plain = http.post(url, json={"payload": "plain"})
    assert plain.status_code == 201
    assert _history_payloads(http, channel_name) == ["once", "twice", "plain"]
    # A failed publish is not remembered: fixing the request and retrying works.
    bad = http.post(url, json={"payload": "x", "room": "r"}, headers={"Idempotency-Key": "k3"})
    assert bad.status_code == 400
    good = http.post(url, json={"payload": "fixed"}, headers={"Idempotency-Key": "k3"})
    assert good.status_code == 201
    too_long = http.post(url, json={"payload": 1}, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400
