"""The paths of the OpenAPI document: every operation, its parameters and answers.

See `herald.openapi` for what the document promises.
"""

from __future__ import annotations

from typing import Any

from herald.auth import SCOPES
from herald.config import Settings
from herald.models import CHANNEL_TYPES
from herald.openapi_schemas import (
    BOOLEAN,
    JSON,
    MAX_BATCH,
    MAX_HISTORY,
    MAX_PAGE,
    MAX_TIMEOUT_MS,
    MAX_TOKEN_TTL,
    MSGPACK,
    TIMESTAMP,
    Schema,
    integer,
    obj,
    ref,
    string,
)

__all__ = ["error_components", "paths"]


def _envelope(
    status: int, data: Schema, *, meta_next: bool = False, warnings: bool = False
) -> Schema:
    meta = obj({"code": {"const": status}}, ("code",))
    if meta_next:
        meta["properties"]["next"] = {
            "type": ["string", "null"],
            "description": "The cursor of the next page; null on the last.",
        }
        meta["required"].append("next")
    properties: dict[str, Schema] = {"data": data, "meta": meta}
    if warnings:
        properties["warnings"] = {
            "type": "array",
            "items": ref("Warning"),
            "description": "The groups that were not applied, when some were not.",
        }
    return obj(properties, ("data", "meta"))


def _content(schema: Schema) -> dict[str, Any]:
    return {JSON: {"schema": schema}, MSGPACK: {"schema": schema}}


def _ok(
    status: int,
    description: str,
    data: Schema,
    *,
    meta_next: bool = False,
    warnings: bool = False,
    location: bool = False,
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": _content(_envelope(status, data, meta_next=meta_next, warnings=warnings)),
    }
    if location:
        response["headers"] = {
            "Location": {
                "description": "Where the resource is.",
                "required": True,
                "schema": string(),
            }
        }
    return response


_ERRORS: dict[int, tuple[str, str, tuple[str, ...]]] = {
    # status: (component name, description, codes)
    400: (
        "BadRequest",
        "The body does not parse (`detail` starts `JSON parse error` or `MessagePack parse "
        "error`) or a field is invalid (`path` names it).",
        ("bad_request",),
    ),
    401: ("Unauthorized", "Missing or invalid credentials.", ("unauthorized",)),
    403: ("Forbidden", "The credentials lack the right.", ("forbidden",)),
    404: (
        "NotFound",
        "No such resource, or none these credentials may know of.",
        ("not_found",),
    ),
    409: ("Conflict", "The resource exists, or is in the wrong state.", ("conflict",)),
    410: ("Gone", "The channel is closed.", ("gone",)),
    413: ("PayloadTooLarge", "The body or a part of it is over its limit.", ("payload_too_large",)),
    429: (
        "TooManyRequests",
        "A rate or count limit was reached: retry after `Retry-After` seconds.",
        ("rate_limited", "too_many_pending_commands"),
    ),
    503: (
        "Unavailable",
        "The engine cannot be reached: retry after `Retry-After` seconds.",
        ("unavailable",),
    ),
    504: ("GatewayTimeout", "The device did not reply in time.", ("timeout",)),
}


def _error_response(description: str, codes: tuple[str, ...], headers: dict[str, Any]) -> Schema:
    schema = {"allOf": [ref("Error"), {"properties": {"code": {"enum": list(codes)}}}]}
    response: dict[str, Any] = {"description": description, "content": _content(schema)}
    if headers:
        response["headers"] = headers
    return response


def error_components(settings: Settings) -> dict[str, Any]:
    """The shared error answers (`components.responses`), one per status."""
    responses = {}
    for status, (name, description, codes) in _ERRORS.items():
        if status == 413:
            description += f" A body holds at most {settings.max_body_bytes} bytes."
        headers: dict[str, Any] = {}
        if status in (429, 503):
            headers["Retry-After"] = {
                "description": "Seconds to wait.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        if status == 401:
            headers["WWW-Authenticate"] = {"required": True, "schema": {"const": "Bearer"}}
        responses[name] = _error_response(description, codes, headers)
    responses["NotConnected"] = _error_response(
        "`not_connected`: no worker holds the device; `opted_out`: the device opted out.",
        ("not_connected", "opted_out"),
        {},
    )
    return responses


def _errors(*statuses: int, **named: str) -> dict[str, Any]:
    """Error responses by status; ``named`` maps a status (``s409``) to another component."""
    responses = {}
    for status in statuses:
        component = named.get(f"s{status}", _ERRORS[status][0])
        responses[str(status)] = {"$ref": f"#/components/responses/{component}"}
    return responses


def _body(schema: Schema, description: str | None = None, *, required: bool = True) -> Schema:
    body: Schema = {"required": required, "content": _content(schema)}
    if description:
        body["description"] = description
    return body


def _path_param(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _flag(name: str, description: str) -> Schema:
    return _query(
        name, {"type": "boolean", "default": False}, f"{description} (`1`, `0`, `true` or `false`)."
    )


def _limit(default: int, maximum: int) -> Schema:
    return _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
        "How many to answer at most.",
    )


_PUBLIC: list[Any] = []
"""``security`` of the endpoints that need no credentials."""

_CHANNEL = _path_param("name", ref("Name"), "The channel.")
_ROOM = _query("room", ref("Name"), "The room, on `separate_rooms` channels (required there).")
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": string(1, 255),
    "description": (
        "1-255 printable characters. A retry with the same key from the same credential "
        "within 10 minutes answers the first message and publishes nothing; 409 while "
        "the first is in flight."
    ),
}

_PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        "`return=minimal` (RFC 7240): answer each published message's id alone, not the "
        "whole message; the answer then carries `Preference-Applied: return=minimal`."
    ),
}


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Any],
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    public: bool = False,
) -> Schema:
    operation: Schema = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = responses
    if public:
        operation["security"] = _PUBLIC
    return operation


def paths(settings: Settings) -> dict[str, Any]:
    """Every path of the document and its operations."""
    update = _operation(
        "update_channel",
        "channels",
        "Change a channel's settings (PUT and PATCH alike change only the fields given)",
        {
            "200": _ok(200, "The channel as it is now.", ref("Channel")),
            **_errors(400, 401, 403, 404, 410, 413, 503),
        },
        parameters=[_CHANNEL],
        body=_body(ref("ChannelUpdate")),
    )
    subscriber_body = _body(ref("SubscriberRequest"))
    return {
        "/healthz": {
            "get": _operation(
                "healthz",
                "health",
                "Alive: the process answers",
                {"200": _ok(200, "Alive.", obj({"status": {"const": "ok"}}, ("status",)))},
                public=True,
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "health",
                "Ready: the engine answers",
                {
                    "200": _ok(200, "Ready.", obj({"status": {"const": "ready"}}, ("status",))),
                    **_errors(503),
                },
                public=True,
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "health",
                "This document",
                {
                    "200": {
                        "description": "The API described as OpenAPI 3.1 (not enveloped).",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
                public=True,
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "health",
                "Prometheus metrics, summed over every worker",
                {
                    "200": {
                        "description": "Prometheus text exposition format (not enveloped).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                public=True,
            )
        },
        "/v1/apps": {
            "post": _operation(
                "create_app",
                "apps",
                "Create an app and its first admin key (operator key only)",
                {
                    "201": _ok(
                        201,
                        "The app and its first admin key, shown this once.",
                        obj(
                            {
                                "name": ref("Name"),
                                "created_at": TIMESTAMP,
                                "admin_key": ref("NewKey"),
                            },
                            ("name", "created_at", "admin_key"),
                        ),
                    ),
                    **_errors(400, 401, 403, 409, 413, 503),
                },
                body=_body(obj({"name": ref("Name")}, ("name",), closed=False)),
            ),
            "get": _operation(
                "list_apps",
                "apps",
                "List apps (operator key only)",
                {
                    "200": _ok(200, "Every app.", {"type": "array", "items": ref("App")}),
                    **_errors(401, 403, 503),
                },
            ),
        },
        "/v1/keys": {
            "post": _operation(
                "create_key",
                "keys",
                "Create an app key (admin scope)",
                {
                    "201": _ok(201, "The key, its secret shown this once.", ref("NewKey")),
                    **_errors(400, 401, 403, 413, 503),
                },
                body=_body(
                    obj(
                        {
                            "scopes": {
                                "type": "array",
                                "items": {"enum": list(SCOPES)},
                                "minItems": 1,
                                "description": "`admin` implies the others.",
                            },
                            "name": string(max_length=128),
                        },
                        ("scopes",),
                        closed=False,
                    )
                ),
            ),
            "get": _operation(
                "list_keys",
                "keys",
                "List the app's keys, without their secrets (admin scope)",
                {
                    "200": _ok(200, "The app keys.", {"type": "array", "items": ref("Key")}),
                    **_errors(401, 403, 503),
                },
            ),
        },
        "/v1/keys/{id}": {
            "delete": _operation(
                "delete_key",
                "keys",
                "Delete a key: it stops working on every worker at once (admin scope)",
                {
                    "200": _ok(200, "The deleted key.", ref("Key")),
                    **_errors(401, 403, 404, 409, 503),
                },
                parameters=[
                    _path_param(
                        "id", string(), "The key id (409 for the operator key's, `bootstrap`)."
                    )
                ],
            )
        },
        "/v1/tokens": {
            "post": _operation(
                "create_token",
                "tokens",
                "Mint a user token (admin scope)",
                {
                    "201": _ok(
                        201,
                        "A JWT (HS256) for the user.",
                        obj(
                            {
                                "token": string(),
                                "user_id": string(1, 128),
                                "expires_at": {
                                    "type": "integer",
                                    "description": "Unix seconds.",
                                },
                            },
                            ("token", "user_id", "expires_at"),
                        ),
                    ),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
                body=_body(
                    obj(
                        {
                            "user_id": string(1, 128),
                            "ttl": integer(1, MAX_TOKEN_TTL, "Seconds; default 3600."),
                        },
                        ("user_id",),
                        closed=False,
                    )
                ),
            )
        },
        "/v1/channels": {
            "post": _operation(
                "create_channel",
                "channels",
                "Create a channel (admin keys and users; the creator owns it)",
                {
                    "201": _ok(
                        201,
                        "The channel, with its keys (shown this once).",
                        ref("CreatedChannel"),
                        location=True,
                    ),
                    **_errors(400, 401, 403, 409, 413, 503),
                },
                body=_body(ref("ChannelCreate")),
            ),
            "get": _operation(
                "list_channels",
                "channels",
                "List channels by name, a page at a time",
                {
                    "200": _ok(
                        200,
                        "A page of channels; `meta.next` is the next page's cursor.",
                        {"type": "array", "items": ref("Channel")},
                        meta_next=True,
                    ),
                    **_errors(400, 401, 503),
                },
                parameters=[
                    _flag("include_inactive", "Include closed channels"),
                    _query("type", {"enum": list(CHANNEL_TYPES)}, "Only channels of this type."),
                    _query("cursor", string(), "`meta.next` of the previous page."),
                    _limit(50, MAX_PAGE),
                ],
            ),
        },
        "/v1/channels/{name}": {
            "get": _operation(
                "get_channel",
                "channels",
                "One channel",
                {
                    "200": _ok(200, "The channel.", ref("Channel")),
                    **_errors(401, 403, 404, 503),
                },
                parameters=[_CHANNEL],
            ),
            "put": update,
            "patch": {**update, "operationId": "patch_channel"},
            "delete": _operation(
                "close_channel",
                "channels",
                "Close a channel for good (closing a closed channel answers it again)",
                {
                    "200": _ok(200, "The closed channel.", ref("Channel")),
                    **_errors(401, 403, 404, 503),
                },
                parameters=[_CHANNEL],
            ),
        },
        "/v1/channels/{name}/publish": {
            "post": _operation(
                "publish",
                "messages",
                "Publish a message; answers once it is in history and handed to the broker",
                {
                    "201": _ok(
                        201,
                        "The message (its id alone with `Prefer: return=minimal`).",
                        {"oneOf": [ref("Message"), ref("Published")]},
                    ),
                    **_errors(400, 401, 403, 404, 409, 410, 413, 429, 503),
                },
                parameters=[_CHANNEL, _IDEMPOTENCY_KEY, _PREFER],
                body=_body(ref("PublishRequest")),
            )
        },
        "/v1/publish": {
            "post": _operation(
                "publish_batch",
                "messages",
                "Publish a batch: one result per item, in order; a failing item does not stop "
                "the others",
                {
                    "200": _ok(
                        200,
                        "One result per item.",
                        {"type": "array", "items": ref("BatchResult")},
                    ),
                    **_errors(400, 401, 413, 429, 503),
                },
                parameters=[_PREFER],
                body=_body(
                    {"type": "array", "items": ref("PublishItem"), "maxItems": MAX_BATCH},
                    f"At most {MAX_BATCH} publishes (413 past it).",
                ),
            )
        },
        "/v1/channels/{name}/history": {
            "get": _operation(
                "history",
                "messages",
                "Retained messages of one topic, oldest first unless reversed",
                {
                    "200": _ok(200, "The messages.", {"type": "array", "items": ref("Message")}),
                    **_errors(400, 401, 403, 404, 503),
                },
                parameters=[
                    _CHANNEL,
                    _ROOM,
                    _query("since", ref("MessageId"), "Only messages after this id."),
                    _query("until", ref("MessageId"), "Only messages before this id."),
                    _limit(100, MAX_HISTORY),
                    _flag("reverse", "Newest first: the newest `limit` messages before `until`"),
                ],
            )
        },
        "/v1/channels/{name}/messages/{id}": {
            "get": _operation(
                "get_message",
                "messages",
                "One retained message (a message's `links.self`)",
                {
                    "200": _ok(200, "The message.", ref("Message")),
                    **_errors(400, 401, 403, 404, 503),
                },
                parameters=[
                    _CHANNEL,
                    _path_param("id", ref("MessageId"), "The message id."),
                    _ROOM,
                ],
            )
        },
        "/v1/channels/{name}/subscribers": {
            "get": _operation(
                "list_subscribers",
                "subscribers",
                "The channel's persistent subscribers (channel admins)",
                {
                    "200": _ok(
                        200,
                        "Devices (with whether they are active) and users.",
                        {
                            "type": "array",
                            "items": {
                                "oneOf": [
                                    obj(
                                        {
                                            "type": {"const": "device"},
                                            "device_id": string(),
                                            "active": BOOLEAN,
                                        },
                                        ("type", "device_id", "active"),
                                    ),
                                    obj(
                                        {"type": {"const": "user"}, "user_id": string()},
                                        ("type", "user_id"),
                                    ),
                                ]
                            },
                        },
                    ),
                    **_errors(401, 403, 404, 503),
                },
                parameters=[_CHANNEL],
            ),
            "post": _operation(
                "add_subscriber",
                "subscribers",
                "Make a device a persistent subscriber (live at once if connected)",
                {
                    "201": _ok(201, "Added.", ref("SubscriberEntry")),
                    "200": _ok(200, "It was already.", ref("SubscriberEntry")),
                    **_errors(400, 401, 403, 404, 410, 413, 503),
                },
                parameters=[_CHANNEL],
                body=subscriber_body,
            ),
            "delete": _operation(
                "remove_subscriber",
                "subscribers",
                "Stop a device's persistent subscription; it stops receiving at once",
                {
                    "200": _ok(200, "Removed.", ref("SubscriberEntry")),
                    **_errors(400, 401, 403, 404, 410, 413, 503),
                },
                parameters=[
                    _CHANNEL,
                    _query(
                        "device_id",
                        ref("Name"),
                        "The device, instead of a body (with `room`, no other parameter).",
                    ),
                    _query("room", ref("Name"), "The room, with `device_id`."),
                ],
                body={**subscriber_body, "required": False},
            ),
        },
        "/v1/devices": {
            "post": _operation(
                "register_device",
                "devices",
                "Register a device, or update the one with this (platform, address)",
                {
                    "201": _ok(
                        201,
                        "A new device, with its connection key (shown this once).",
                        obj(
                            {
                                "device_id": string(),
                                "connection_key": string(),
                                "device": ref("Device"),
                            },
                            ("device_id", "connection_key", "device"),
                        ),
                        location=True,
                    ),
                    "200": _ok(
                        200,
                        "The device was registered already: updated.",
                        obj(
                            {"device_id": string(), "device": ref("Device")},
                            ("device_id", "device"),
                        ),
                        location=True,
                    ),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
                body=_body(obj({"device": ref("DeviceFields")}, ("device",))),
            )
        },
        "/v1/devices/tags": {
            "post": _operation(
                "change_tags",
                "devices",
                "Add, remove or set a device's tag groups",
                {
                    "200": _ok(
                        200,
                        "The device's tags; invalid groups were skipped and are in `warnings`.",
                        obj(
                            {
                                "device_id": string(),
                                "tags": {
                                    "type": "object",
                                    "additionalProperties": {"type": "array", "items": string()},
                                },
                            },
                            ("device_id", "tags"),
                        ),
                        warnings=True,
                    ),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
                body=_body(
                    {
                        "description": "`add` and/or `remove`, or `set` alone (an empty list "
                        "removes the group). A request with no valid group is a 400.",
                        "oneOf": [
                            {
                                **obj(
                                    {
                                        "audience": ref("DeviceSelector"),
                                        "add": ref("TagGroups"),
                                        "remove": ref("TagGroups"),
                                    },
                                    ("audience",),
                                ),
                                "anyOf": [{"required": ["add"]}, {"required": ["remove"]}],
                            },
                            obj(
                                {"audience": ref("DeviceSelector"), "set": ref("TagGroups")},
                                ("audience", "set"),
                            ),
                        ],
                    }
                ),
            )
        },
        "/v1/devices/uninstall": {
            "post": _operation(
                "uninstall_device",
                "devices",
                "Forget a device: disconnected, unsubscribed, its key revoked",
                {
                    "202": _ok(
                        202,
                        "Uninstalled.",
                        obj(
                            {"device_id": string(), "uninstalled": {"const": True}},
                            ("device_id", "uninstalled"),
                        ),
                    ),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
                body=_body(ref("DeviceSelector")),
            )
        },
        "/v1/devices/{device_id}": {
            "get": _operation(
                "get_device",
                "devices",
                "One device, never its key (admin keys and the device itself)",
                {
                    "200": _ok(200, "The device.", ref("Device")),
                    **_errors(401, 403, 404, 503),
                },
                parameters=[_path_param("device_id", string(), "The device id.")],
            )
        },
        "/v1/devices/{target}/commands": {
            "post": _operation(
                "send_command",
                "devices",
                "Send a command to one device and wait for its reply, or to `chref:<ref>` "
                "(every connected device subscriber of that channel) without waiting",
                {
                    "200": _ok(
                        200,
                        "The device's reply, or for `chref:` the multicast's acceptance.",
                        {
                            "oneOf": [
                                obj(
                                    {
                                        "command_id": string(),
                                        "device_id": string(),
                                        "reply": {"description": "What the device replied."},
                                    },
                                    ("command_id", "device_id", "reply"),
                                ),
                                obj(
                                    {"command_id": string(), "delivered": {"const": "accepted"}},
                                    ("command_id", "delivered"),
                                ),
                            ]
                        },
                    ),
                    **_errors(400, 401, 403, 404, 409, 413, 429, 503, 504, s409="NotConnected"),
                },
                parameters=[
                    _path_param(
                        "target", string(), "A device id, or `chref:<ref>` (a channel's ref)."
                    )
                ],
                body=_body(
                    obj(
                        {
                            "payload": {
                                "description": f"Any JSON value of at most "
                                f"{settings.max_payload_bytes} bytes as JSON."
                            },
                            "timeout_ms": integer(
                                1, MAX_TIMEOUT_MS, "How long to wait for the reply; default 5000."
                            ),
                        },
                        ("payload",),
                    )
                ),
            )
        },
    }
