"""``GET /openapi.json``: a valid OpenAPI 3.1 document that covers every route and
that a running server lives up to (checked by schemathesis against a real process)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema_rs
import msgpack
import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.routing import Route

from herald import web
from herald.access import AccessLog
from herald.api import HotPaths
from herald.app import create_app
from herald.config import Settings
from herald.openapi import build_document
from tests.support import ServerProcess, scaled, start_server

_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
_SEED = 20240601
_MAX_EXAMPLES = 25


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in _METHODS:
                yield method, path, operation


def _refs(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_document(Settings())
    assert document["openapi"] == "3.1.0"
    # The OpenAPI 3.1 meta-schema (raises with the first violation).
    schemathesis.openapi.from_dict(document).validate()
    # Every schema is a valid JSON Schema 2020-12, and every reference resolves.
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for ref in set(_refs(document)):
        assert ref.startswith("#/components/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            node = node[part]
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"] == {**schemes["apiKey"], "in": "header", "name": "X-API-Key"}
    ids = [operation["operationId"] for _, _, operation in _operations(document)]
    assert len(ids) == len(set(ids))
    for method, path, operation in _operations(document):
        statuses = set(operation["responses"])
        assert any(s.startswith("2") for s in statuses), (method, path)
        if path.startswith("/v1/"):
            assert "security" not in operation, (method, path)  # the global bearer/key
            assert "401" in statuses, (method, path)
        else:
            assert operation["security"] == [], (method, path)
        if "requestBody" in operation:
            assert {"400", "413"} <= statuses, (method, path)


def test_settings_set_the_limits_the_document_states() -> None:
    document = build_document(Settings(max_history_size=500, max_payload_bytes=1000))
    schemas = document["components"]["schemas"]
    size = schemas["ChannelCreate"]["properties"]["history_size"]
    assert size["maximum"] == 500
    assert "1000 bytes" in schemas["PublishRequest"]["properties"]["payload"]["description"]


def test_every_route_is_documented_and_nothing_else() -> None:
    app = create_app(Settings())
    assert isinstance(app, AccessLog)
    assert isinstance(app.app, HotPaths)
    starlette = app.app.app
    assert isinstance(starlette, Starlette)
    served = set()
    for route in starlette.routes:
        assert isinstance(route, Route), f"{route!r}: only plain routes are checked here"
        assert route.methods is not None
        if route in web.routes:  # the dashboard and its files: web pages, not the API
            continue
        served |= {(method.lower(), route.path) for method in route.methods - {"HEAD"}}
    documented = {(method, path) for method, path, _ in _operations(build_document(Settings()))}
    assert served == documented


def test_the_server_serves_the_document(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/openapi.json", timeout=scaled(10))  # no credentials
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == build_document(Settings())


# Schemathesis against a live server of the module's own.


def _wire(value: Any) -> Any:
    """``value`` with the integers MessagePack cannot carry as floats, as JSON parsing
    (orjson) gives them to the server: the same request in either encoding."""
    if isinstance(value, dict):
        return {key: _wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wire(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


@schemathesis.serializer("application/msgpack")
def _to_msgpack(context: schemathesis.SerializationContext, value: Any) -> bytes:
    packed: bytes = msgpack.packb(_wire(value), use_bin_type=True)
    return packed


# Parameters draw on these values some of the time, so that requests reach past the
# 404s; the seeded ids (random) are placeholders that `_Seeded.fill` replaces with
# what the server made. `limit` sometimes gets digits that are not ASCII.
_DICTIONARIES = {
    "channels": ["fuzzed", "fuzzed-rooms"],
    "devices": ["seeded-device"],
    "targets": ["seeded-device", "seeded-chref"],
    "ids": ["seeded-message", "bootstrap"],
    "digits": ["\u00b2", "\u0661\u0662", "\uff15"],
}
_BINDINGS = {
    "path.name": ("channels", 0.5),
    "path.device_id": ("devices", 0.5),
    "path.target": ("targets", 0.5),
    "path.id": ("ids", 0.5),
    "query.device_id": ("devices", 0.5),
    "query.limit": ("digits", 0.1),
}
# The coverage phase's negative cases (every field made invalid in turn) cost about
# 40 s more; HERALD_TEST_FUZZ_THOROUGH=1 runs them, with ten times the examples.
_THOROUGH = os.environ.get("HERALD_TEST_FUZZ_THOROUGH") == "1"

# The document is built here rather than fetched (`test_the_server_serves_the_document`
# shows they are the same): `schemathesis.pytest.from_fixture`, which could fetch it
# from the server fixture, reads `request.node._nodeid`, which pytest 9.2 removed.
schema = schemathesis.openapi.from_dict(
    build_document(Settings()),
    config=schemathesis.Config.from_dict(
        {
            "seed": _SEED,
            "generation": {
                "max-examples": _MAX_EXAMPLES * (10 if _THOROUGH else 1),
                "deterministic": True,
                # The credentials are the server's admin key (`headers` of each call).
                "with-security-parameters": False,
            },
            "phases": {
                "coverage": {"generation": {"mode": "all" if _THOROUGH else "positive"}},
                "stateful": {"enabled": False},
            },
            "dictionaries": {name: {"values": values} for name, values in _DICTIONARIES.items()},
            "parameters": {
                key: {"dictionary": name, "probability": probability}
                for key, (name, probability) in _BINDINGS.items()
            },
        }
    ),
)


@dataclass(frozen=True)
class _Seeded:
    """A server of the module's own, and what it was seeded with."""

    server: ServerProcess
    values: dict[str, str]

    def fill(self, case: schemathesis.Case[Any]) -> None:
        """Put the seeded ids where the placeholders are."""
        for container in (case.path_parameters, case.query):
            if container:
                for name, value in container.items():
                    if isinstance(value, str):
                        container[name] = self.values.get(value, value)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Seeded]:
    """A server with a few things to find (channels, a device, a message)."""
    server = start_server(tmp_path_factory.mktemp("openapi"))
    try:
        yield _Seeded(server, _seed(server))
    finally:
        server.stop(signal.SIGKILL)


def _seed(server: ServerProcess) -> dict[str, str]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=scaled(10)) as http:
        created = http.post("/v1/channels", json={"name": "fuzzed", "custom_publish": True})
        assert created.status_code == 201, created.text
        ref = created.json()["data"]["keys"]["ref"]
        rooms = http.post("/v1/channels", json={"name": "fuzzed-rooms", "type": "separate_rooms"})
        assert rooms.status_code == 201, rooms.text
        device = http.post("/v1/devices", json={"device": {"address": "a1", "platform": "toy"}})
        assert device.status_code == 201, device.text
        device_id = device.json()["data"]["device_id"]
        added = http.post("/v1/channels/fuzzed/subscribers", json={"device_id": device_id})
        assert added.status_code == 201, added.text
        published = http.post("/v1/channels/fuzzed/publish", json={"payload": {"n": 1}})
        assert published.status_code == 201, published.text
        message_id = published.json()["data"]["id"]
    return {
        "seeded-device": device_id,
        "seeded-chref": f"chref:{ref}",
        "seeded-message": message_id,
    }


@schema.parametrize()
def test_the_server_lives_up_to_the_document(case: schemathesis.Case[Any], seeded: _Seeded) -> None:
    seeded.fill(case)
    case.call_and_validate(
        base_url=seeded.server.url,
        headers=seeded.server.headers,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
        timeout=scaled(10),
    )


def test_batch_items_with_unhashable_channels_fail_alone(seeded: _Seeded) -> None:
    """Found by the run above (with another seed): a batch item whose channel is a list
    or an object made the whole batch a 500."""
    server = seeded.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=scaled(10)) as http:
        assert http.post("/v1/channels", json={"name": "batched"}).status_code == 201
        items = [{"channel": [], "payload": 1}, {"channel": {}, "payload": 1}]
        response = http.post("/v1/publish", json=[*items, {"channel": "batched", "payload": 2}])
    assert response.status_code == 200, response.text
    results = response.json()["data"]
    assert [r["status"] for r in results] == [400, 400, 201]
    assert results[0]["error"]["path"] == "channel"
