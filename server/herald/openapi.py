"""The HTTP API described as OpenAPI 3.1, served at ``GET /openapi.json``.

The schemas say what the validation code enforces (`herald.channels`,
`herald.models`, `herald.registration`, `herald.tags`, `herald.audience`,
`herald.identity`, `herald.commands`, `herald.devices`) and no more: what a
JSON Schema cannot say (a size counted in bytes of JSON, an audience's depth)
is in the descriptions. Limits that are settings come from the server's own
`Settings`, so the document describes the server that serves it.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald import __version__
from herald.api import node_of
from herald.audience import MAX_DEPTH, MAX_OPERANDS, MAX_SELECTORS
from herald.auth import CHANNEL_KEYS, SCOPES
from herald.config import Settings
from herald.models import CHANNEL_TYPES
from herald.tags import DEFAULT_GROUP, MAX_TAGS, RESERVED_PREFIX

__all__ = ["build_document", "routes"]

Schema = dict[str, Any]

_JSON = "application/json"
_MSGPACK = "application/msgpack"
_NAME_PATTERN = "^[A-Za-z0-9_.:-]{1,128}$"  # herald.models.check_name
_OFFSET_PATTERN = "^[0-9]{1,20}-[0-9]{1,20}$"  # herald.models.parse_offset
_TAG_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"  # herald.tags.is_tag_name
_MAX_TTL = 10 * 365 * 86400  # history_ttl and idle_timeout (herald.channels)
_MAX_TOKEN_TTL = 30 * 86400  # herald.identity
_MAX_TIMEOUT_MS = 60_000  # herald.commands
_MAX_PAGE = 200  # herald.api
_MAX_HISTORY = 1000  # herald.api
_MAX_BATCH = 1000  # herald.api


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(
    properties: dict[str, Schema],
    required: tuple[str, ...] = (),
    *,
    closed: bool = True,
    description: str | None = None,
) -> Schema:
    """An object schema; ``closed`` when the server refuses (or never sends) other fields."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _string(
    min_length: int | None = None,
    max_length: int | None = None,
    pattern: str | None = None,
    description: str | None = None,
) -> Schema:
    schema: Schema = {"type": "string"}
    if min_length is not None:
        schema["minLength"] = min_length
    if max_length is not None:
        schema["maxLength"] = max_length
    if pattern is not None:
        schema["pattern"] = pattern
    if description:
        schema["description"] = description
    return schema


def _nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


def _integer(minimum: int, maximum: int, description: str | None = None) -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


_BOOLEAN: Schema = {"type": "boolean"}
_TIMESTAMP = _string(description="RFC 3339, UTC, microseconds.")
_TIMESTAMP["format"] = "date-time"


def _schemas(settings: Settings) -> dict[str, Schema]:
    """The named schemas of the document."""
    max_payload = settings.max_payload_bytes
    name = _string(1, 128, _NAME_PATTERN, "1-128 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'.")
    tag_name = _string(1, 128, _TAG_PATTERN, "1-128 characters without control characters.")
    tag_list: Schema = {
        "type": "array",
        "items": _ref("TagName"),
        "description": f"At most {MAX_TAGS} distinct tags (duplicates are dropped, order kept).",
    }
    group_name = _string(
        1,
        128,
        f"^(?!{RESERVED_PREFIX})[^\\u0000-\\u001f\\u007f-\\u009f]+$",
        f"A tag group name; groups starting with {RESERVED_PREFIX!r} are set by Herald.",
    )
    groups: Schema = {
        "type": "object",
        "propertyNames": group_name,
        "additionalProperties": tag_list,
        "description": "Tag groups: `{group: [tags]}`.",
    }
    acl_fields = {
        "public": _BOOLEAN,
        "any_user": _BOOLEAN,
        "user_ids": {
            "type": "array",
            "items": _string(1, 128),
            "maxItems": 1000,
            "description": "User ids (duplicates are dropped).",
        },
        "immutable": _BOOLEAN,
    }
    room = _nullable(
        _string(
            max_length=128,
            pattern="^[A-Za-z0-9_.:-]*$",
            description=(
                "The room: required (a name) on `separate_rooms` channels, "
                "absent, null or empty on others."
            ),
        )
    )
    ttl = _nullable(_integer(1, _MAX_TTL, "Seconds; null for none."))
    annotations: Schema = {
        "type": "array",
        "items": _ref("Annotation"),
        "description": f"At most {settings.max_annotations_bytes} bytes as JSON, all together.",
    }
    channel_settings: dict[str, Schema] = {
        "description": _string(max_length=1024),
        "custom_publish": {
            "type": "boolean",
            "description": "Whether users (and devices) may publish, as `writers` allows.",
        },
        "readers": _ref("ACLInput"),
        "writers": _ref("ACLInput"),
        "editors": _ref("ACLInput"),
        "annotations": annotations,
        "history_size": _nullable(
            _integer(1, settings.max_history_size, "Messages kept per topic; null keeps it.")
        ),
        "history_ttl": ttl,
        "idle_timeout": {
            **ttl,
            "description": "Seconds without a publish after which the channel closes itself.",
        },
    }
    key_record = _obj(
        {
            "id": _string(),
            "scopes": {
                "type": "array",
                "items": {"enum": [*SCOPES, *CHANNEL_KEYS]},
                "minItems": 1,
                "description": "App key scopes; a channel key (deletable here) has one of "
                "its kind.",
            },
            "name": _string(),
            "created_at": _TIMESTAMP,
        },
        ("id", "scopes", "name", "created_at"),
    )
    publish: dict[str, Schema] = {
        "payload": {"description": f"Any JSON value of at most {max_payload} bytes as JSON."},
        "room": room,
        "metadata": {
            "type": ["object", "null"],
            "description": f"At most {settings.max_metadata_bytes} bytes as JSON.",
        },
        "audience": {"oneOf": [_ref("Audience"), {"type": "null"}]},
    }
    channel = _obj(
        {
            "name": _ref("Name"),
            "id": _string(),
            "description": _string(),
            "type": {"enum": list(CHANNEL_TYPES)},
            "custom_publish": _BOOLEAN,
            "readers": _ref("ACL"),
            "writers": _ref("ACL"),
            "editors": _ref("ACL"),
            "annotations": {"type": "array", "items": _ref("Annotation")},
            "history_size": {"type": "integer", "minimum": 1},
            "history_ttl": {"type": ["integer", "null"], "minimum": 1},
            "idle_timeout": {"type": ["integer", "null"], "minimum": 1},
            "owner": {"oneOf": [_ref("Author"), {"type": "null"}]},
            "is_inactive": _BOOLEAN,
            "created_at": _TIMESTAMP,
            "counts": _obj(
                {
                    "messages": {"type": "integer", "minimum": 0},
                    "subscribers": {"type": "integer", "minimum": 0},
                    "connections": {"type": "integer", "minimum": 0},
                },
                ("messages", "subscribers", "connections"),
            ),
            "you_can_edit": {**_BOOLEAN, "description": "For user tokens only."},
            "you_subscribed": {**_BOOLEAN, "description": "For user tokens only."},
        },
        (
            "name",
            "id",
            "description",
            "type",
            "custom_publish",
            "readers",
            "writers",
            "editors",
            "annotations",
            "history_size",
            "history_ttl",
            "idle_timeout",
            "owner",
            "is_inactive",
            "created_at",
            "counts",
        ),
    )
    selector_by_id = _obj({"device_id": _string(1, 128)}, ("device_id",))
    selector_by_address = _obj(
        {"address": _ref("DeviceAddress"), "platform": _ref("Platform")},
        ("address", "platform"),
    )
    return {
        "Name": name,
        "MessageId": _string(
            pattern=_OFFSET_PATTERN,
            description="A message id: `<milliseconds>-<sequence>`, sorting in publish order.",
        ),
        "TagName": tag_name,
        "TagGroups": groups,
        "Platform": _string(1, 64, "^[A-Za-z0-9_.:-]{1,64}$"),
        "DeviceAddress": _string(1, 1024),
        "Error": _obj(
            {
                "detail": _string(description="What went wrong, for people."),
                "code": _string(description="What went wrong, for programs."),
                "path": _string(description="The field at fault, when there is one."),
            },
            ("detail", "code"),
        ),
        "Warning": _obj({"path": _string(), "detail": _string()}, ("path", "detail")),
        "Author": _obj(
            {"type": {"enum": ["key", "user", "device"]}, "id": _string()}, ("type", "id")
        ),
        "ACLInput": _obj(acl_fields, description="Who may do something; omitted flags are false."),
        "ACL": _obj(acl_fields, ("public", "any_user", "user_ids", "immutable")),
        "Annotation": _obj(
            {"type": _string(1, 256), "value": {"description": "Any JSON value."}},
            ("type", "value"),
        ),
        "ChannelCreate": _obj(
            {
                "name": _ref("Name"),
                "type": {"enum": list(CHANNEL_TYPES), "default": "default"},
                **channel_settings,
            },
            ("name",),
        ),
        "ChannelUpdate": _obj(
            {
                "name": {**_ref("Name"), "description": "Fixed: only the current name."},
                "type": {
                    "enum": list(CHANNEL_TYPES),
                    "description": "Fixed: only the current type.",
                },
                **channel_settings,
            },
            description="Only the fields given change; an immutable ACL cannot change.",
        ),
        "Channel": channel,
        "CreatedChannel": _obj(
            {
                **channel["properties"],
                "keys": _obj(
                    {kind: _string() for kind in CHANNEL_KEYS},
                    CHANNEL_KEYS,
                    description="The channel's keys, shown this once.",
                ),
            },
            (*channel["required"], "keys"),
        ),
        "Audience": {
            "description": (
                "Which device subscribers receive the message: at most "
                f"{MAX_DEPTH} levels deep and {MAX_SELECTORS} selectors in all."
            ),
            "oneOf": [
                _obj(
                    {
                        "tag": _ref("TagName"),
                        "group": {**_ref("TagName"), "default": DEFAULT_GROUP},
                    },
                    ("tag",),
                ),
                *(
                    _obj(
                        {
                            form: {
                                "type": "array",
                                "items": _ref("Audience"),
                                "minItems": 1,
                                "maxItems": MAX_OPERANDS,
                            }
                        },
                        (form,),
                    )
                    for form in ("and", "or")
                ),
                _obj({"not": _ref("Audience")}, ("not",)),
                _obj({"device_id": _string(1, 128)}, ("device_id",)),
            ],
        },
        "PublishRequest": _obj(publish, ("payload",)),
        "PublishItem": _obj({"channel": _ref("Name"), **publish}, ("channel", "payload")),
        "Message": _obj(
            {
                "id": _ref("MessageId"),
                "channel": _ref("Name"),
                "room": _string(description="Empty on channels without rooms."),
                "payload": {"description": "The published JSON value."},
                "author": _ref("Author"),
                "created_at": _TIMESTAMP,
                "action": {"const": "custom"},
                "metadata": {"type": ["object", "null"]},
                "links": _obj({"self": _string()}, ("self",)),
            },
            (
                "id",
                "channel",
                "room",
                "payload",
                "author",
                "created_at",
                "action",
                "metadata",
                "links",
            ),
        ),
        "BatchResult": {
            "oneOf": [
                _obj({"status": {"const": 201}, "data": _ref("Message")}, ("status", "data")),
                _obj(
                    {"status": _integer(400, 599), "error": _ref("Error")},
                    ("status", "error"),
                ),
            ]
        },
        "App": _obj({"name": _ref("Name"), "created_at": _TIMESTAMP}, ("name", "created_at")),
        "Key": key_record,
        "NewKey": _obj(
            {**key_record["properties"], "key": _string(description="The secret, shown once.")},
            (*key_record["required"], "key"),
        ),
        "DeviceFields": _obj(
            {
                "address": _ref("DeviceAddress"),
                "platform": _ref("Platform"),
                "opt_in": _BOOLEAN,
                "tags": {
                    "description": f"A list (the {DEFAULT_GROUP!r} group) or tag groups; "
                    "replaces every group but Herald's own.",
                    "oneOf": [tag_list, _ref("TagGroups")],
                },
                "timezone": _nullable(_string(pattern="^[A-Za-z0-9_+/-]{1,64}$")),
                "locale_country": _nullable(_string(pattern="^[A-Za-z]{2}$")),
                "locale_language": _nullable(_string(pattern="^[A-Za-z]{2,3}$")),
                "identifiers": {
                    "type": "object",
                    "maxProperties": 100,
                    "propertyNames": _string(1, 128),
                    "additionalProperties": _string(max_length=1024),
                    "description": "Replaces the stored identifiers whole.",
                },
            },
            ("address", "platform"),
        ),
        "Device": _obj(
            {
                "device_id": _string(),
                "address": _string(),
                "platform": _string(),
                "opt_in": _BOOLEAN,
                "tags": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": _string()},
                },
                "timezone": {"type": ["string", "null"]},
                "locale_country": {"type": ["string", "null"]},
                "locale_language": {"type": ["string", "null"]},
                "identifiers": {"type": "object", "additionalProperties": _string()},
                "created_at": _TIMESTAMP,
                "updated_at": _TIMESTAMP,
            },
            (
                "device_id",
                "address",
                "platform",
                "opt_in",
                "tags",
                "timezone",
                "locale_country",
                "locale_language",
                "identifiers",
                "created_at",
                "updated_at",
            ),
        ),
        "DeviceSelector": {
            "description": "One device: by id, or by (address, platform).",
            "oneOf": [selector_by_id, selector_by_address],
        },
        "SubscriberRequest": {
            **_obj(
                {
                    "device_id": _ref("Name"),
                    "connection_key": _string(),
                    "room": room,
                },
                description="The device: exactly one of `device_id` and `connection_key`.",
            ),
            "oneOf": [{"required": ["device_id"]}, {"required": ["connection_key"]}],
        },
        "SubscriberEntry": _obj(
            {
                "type": {"const": "device"},
                "device_id": _string(),
                "room": _string(),
                "active": {
                    "type": "boolean",
                    "description": "Connected to a live worker and opted in.",
                },
            },
            ("type", "device_id", "room", "active"),
        ),
    }


def _envelope(
    status: int, data: Schema, *, meta_next: bool = False, warnings: bool = False
) -> Schema:
    meta = _obj({"code": {"const": status}}, ("code",))
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
            "items": _ref("Warning"),
            "description": "The groups that were not applied, when some were not.",
        }
    return _obj(properties, ("data", "meta"))


def _content(schema: Schema) -> dict[str, Any]:
    return {_JSON: {"schema": schema}, _MSGPACK: {"schema": schema}}


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
                "schema": _string(),
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
    schema = {"allOf": [_ref("Error"), {"properties": {"code": {"enum": list(codes)}}}]}
    response: dict[str, Any] = {"description": description, "content": _content(schema)}
    if headers:
        response["headers"] = headers
    return response


def _error_components(settings: Settings) -> dict[str, Any]:
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

_CHANNEL = _path_param("name", _ref("Name"), "The channel.")
_ROOM = _query("room", _ref("Name"), "The room, on `separate_rooms` channels (required there).")
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": _string(1, 255),
    "description": (
        "1-255 printable characters. A retry with the same key from the same credential "
        "within 10 minutes answers the first message and publishes nothing; 409 while "
        "the first is in flight."
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


def _paths(settings: Settings) -> dict[str, Any]:
    update = _operation(
        "update_channel",
        "channels",
        "Change a channel's settings (PUT and PATCH alike change only the fields given)",
        {
            "200": _ok(200, "The channel as it is now.", _ref("Channel")),
            **_errors(400, 401, 403, 404, 410, 413, 503),
        },
        parameters=[_CHANNEL],
        body=_body(_ref("ChannelUpdate")),
    )
    subscriber_body = _body(_ref("SubscriberRequest"))
    return {
        "/healthz": {
            "get": _operation(
                "healthz",
                "health",
                "Alive: the process answers",
                {"200": _ok(200, "Alive.", _obj({"status": {"const": "ok"}}, ("status",)))},
                public=True,
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "health",
                "Ready: the engine answers",
                {
                    "200": _ok(200, "Ready.", _obj({"status": {"const": "ready"}}, ("status",))),
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
                        "content": {_JSON: {"schema": {"type": "object"}}},
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
                        _obj(
                            {
                                "name": _ref("Name"),
                                "created_at": _TIMESTAMP,
                                "admin_key": _ref("NewKey"),
                            },
                            ("name", "created_at", "admin_key"),
                        ),
                    ),
                    **_errors(400, 401, 403, 409, 413, 503),
                },
                body=_body(_obj({"name": _ref("Name")}, ("name",), closed=False)),
            ),
            "get": _operation(
                "list_apps",
                "apps",
                "List apps (operator key only)",
                {
                    "200": _ok(200, "Every app.", {"type": "array", "items": _ref("App")}),
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
                    "201": _ok(201, "The key, its secret shown this once.", _ref("NewKey")),
                    **_errors(400, 401, 403, 413, 503),
                },
                body=_body(
                    _obj(
                        {
                            "scopes": {
                                "type": "array",
                                "items": {"enum": list(SCOPES)},
                                "minItems": 1,
                                "description": "`admin` implies the others.",
                            },
                            "name": _string(max_length=128),
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
                    "200": _ok(200, "The app keys.", {"type": "array", "items": _ref("Key")}),
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
                    "200": _ok(200, "The deleted key.", _ref("Key")),
                    **_errors(401, 403, 404, 409, 503),
                },
                parameters=[
                    _path_param(
                        "id", _string(), "The key id (409 for the operator key's, `bootstrap`)."
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
                        _obj(
                            {
                                "token": _string(),
                                "user_id": _string(1, 128),
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
                    _obj(
                        {
                            "user_id": _string(1, 128),
                            "ttl": _integer(1, _MAX_TOKEN_TTL, "Seconds; default 3600."),
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
                        _ref("CreatedChannel"),
                        location=True,
                    ),
                    **_errors(400, 401, 403, 409, 413, 503),
                },
                body=_body(_ref("ChannelCreate")),
            ),
            "get": _operation(
                "list_channels",
                "channels",
                "List channels by name, a page at a time",
                {
                    "200": _ok(
                        200,
                        "A page of channels; `meta.next` is the next page's cursor.",
                        {"type": "array", "items": _ref("Channel")},
                        meta_next=True,
                    ),
                    **_errors(400, 401, 503),
                },
                parameters=[
                    _flag("include_inactive", "Include closed channels"),
                    _query("type", {"enum": list(CHANNEL_TYPES)}, "Only channels of this type."),
                    _query("cursor", _string(), "`meta.next` of the previous page."),
                    _limit(50, _MAX_PAGE),
                ],
            ),
        },
        "/v1/channels/{name}": {
            "get": _operation(
                "get_channel",
                "channels",
                "One channel",
                {
                    "200": _ok(200, "The channel.", _ref("Channel")),
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
                    "200": _ok(200, "The closed channel.", _ref("Channel")),
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
                    "201": _ok(201, "The message.", _ref("Message")),
                    **_errors(400, 401, 403, 404, 409, 410, 413, 429, 503),
                },
                parameters=[_CHANNEL, _IDEMPOTENCY_KEY],
                body=_body(_ref("PublishRequest")),
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
                        {"type": "array", "items": _ref("BatchResult")},
                    ),
                    **_errors(400, 401, 413, 429, 503),
                },
                body=_body(
                    {"type": "array", "items": _ref("PublishItem"), "maxItems": _MAX_BATCH},
                    f"At most {_MAX_BATCH} publishes (413 past it).",
                ),
            )
        },
        "/v1/channels/{name}/history": {
            "get": _operation(
                "history",
                "messages",
                "Retained messages of one topic, oldest first unless reversed",
                {
                    "200": _ok(200, "The messages.", {"type": "array", "items": _ref("Message")}),
                    **_errors(400, 401, 403, 404, 503),
                },
                parameters=[
                    _CHANNEL,
                    _ROOM,
                    _query("since", _ref("MessageId"), "Only messages after this id."),
                    _query("until", _ref("MessageId"), "Only messages before this id."),
                    _limit(100, _MAX_HISTORY),
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
                    "200": _ok(200, "The message.", _ref("Message")),
                    **_errors(400, 401, 403, 404, 503),
                },
                parameters=[
                    _CHANNEL,
                    _path_param("id", _ref("MessageId"), "The message id."),
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
                                    _obj(
                                        {
                                            "type": {"const": "device"},
                                            "device_id": _string(),
                                            "active": _BOOLEAN,
                                        },
                                        ("type", "device_id", "active"),
                                    ),
                                    _obj(
                                        {"type": {"const": "user"}, "user_id": _string()},
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
                    "201": _ok(201, "Added.", _ref("SubscriberEntry")),
                    "200": _ok(200, "It was already.", _ref("SubscriberEntry")),
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
                    "200": _ok(200, "Removed.", _ref("SubscriberEntry")),
                    **_errors(400, 401, 403, 404, 410, 413, 503),
                },
                parameters=[
                    _CHANNEL,
                    _query(
                        "device_id",
                        _ref("Name"),
                        "The device, instead of a body (with `room`, no other parameter).",
                    ),
                    _query("room", _ref("Name"), "The room, with `device_id`."),
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
                        _obj(
                            {
                                "device_id": _string(),
                                "connection_key": _string(),
                                "device": _ref("Device"),
                            },
                            ("device_id", "connection_key", "device"),
                        ),
                        location=True,
                    ),
                    "200": _ok(
                        200,
                        "The device was registered already: updated.",
                        _obj(
                            {"device_id": _string(), "device": _ref("Device")},
                            ("device_id", "device"),
                        ),
                        location=True,
                    ),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
                body=_body(_obj({"device": _ref("DeviceFields")}, ("device",))),
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
                        _obj(
                            {
                                "device_id": _string(),
                                "tags": {
                                    "type": "object",
                                    "additionalProperties": {"type": "array", "items": _string()},
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
                                **_obj(
                                    {
                                        "audience": _ref("DeviceSelector"),
                                        "add": _ref("TagGroups"),
                                        "remove": _ref("TagGroups"),
                                    },
                                    ("audience",),
                                ),
                                "anyOf": [{"required": ["add"]}, {"required": ["remove"]}],
                            },
                            _obj(
                                {"audience": _ref("DeviceSelector"), "set": _ref("TagGroups")},
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
                        _obj(
                            {"device_id": _string(), "uninstalled": {"const": True}},
                            ("device_id", "uninstalled"),
                        ),
                    ),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
                body=_body(_ref("DeviceSelector")),
            )
        },
        "/v1/devices/{device_id}": {
            "get": _operation(
                "get_device",
                "devices",
                "One device, never its key (admin keys and the device itself)",
                {
                    "200": _ok(200, "The device.", _ref("Device")),
                    **_errors(401, 403, 404, 503),
                },
                parameters=[_path_param("device_id", _string(), "The device id.")],
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
                                _obj(
                                    {
                                        "command_id": _string(),
                                        "device_id": _string(),
                                        "reply": {"description": "What the device replied."},
                                    },
                                    ("command_id", "device_id", "reply"),
                                ),
                                _obj(
                                    {"command_id": _string(), "delivered": {"const": "accepted"}},
                                    ("command_id", "delivered"),
                                ),
                            ]
                        },
                    ),
                    **_errors(400, 401, 403, 404, 409, 413, 429, 503, 504, s409="NotConnected"),
                },
                parameters=[
                    _path_param(
                        "target", _string(), "A device id, or `chref:<ref>` (a channel's ref)."
                    )
                ],
                body=_body(
                    _obj(
                        {
                            "payload": {
                                "description": f"Any JSON value of at most "
                                f"{settings.max_payload_bytes} bytes as JSON."
                            },
                            "timeout_ms": _integer(
                                1, _MAX_TIMEOUT_MS, "How long to wait for the reply; default 5000."
                            ),
                        },
                        ("payload",),
                    )
                ),
            )
        },
    }


@functools.lru_cache(maxsize=4)
def _encoded(settings: Settings) -> bytes:
    return orjson.dumps(build_document(settings))


def build_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API of a server run with ``settings``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Herald",
            "version": __version__,
            "summary": "Realtime WebSocket pub/sub: the HTTP API.",
            "description": (
                'Successful answers are `{"data": ..., "meta": {"code": N}}` '
                '(listings add `meta.next`); errors are `{"detail", "code", "path"?}`. '
                "Bodies and answers are JSON, or MessagePack when `Content-Type` (for the "
                "body) or `Accept` (for the answer) is `application/msgpack`. The WebSocket "
                "protocol (`/v1/connect`) is not described here."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "tags": [
            {"name": "health", "description": "Liveness, readiness and this document."},
            {"name": "apps", "description": "Tenants (operator key)."},
            {"name": "keys", "description": "App keys (admin scope)."},
            {"name": "tokens", "description": "User tokens (admin scope)."},
            {"name": "channels", "description": "Channels and their settings."},
            {"name": "messages", "description": "Publishing and history."},
            {"name": "subscribers", "description": "Persistent subscribers of a channel."},
            {"name": "devices", "description": "Devices, their tags and commands."},
        ],
        "paths": _paths(settings),
        "components": {
            "schemas": _schemas(settings),
            "responses": _error_components(settings),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An app key, a channel key, a device's connection key "
                    "or a user token (JWT).",
                },
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "A key, when `Authorization` is not a bearer credential.",
                },
            },
        },
    }


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: the document, built once per settings."""
    return Response(_encoded(node_of(request).settings), media_type=_JSON)


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
"""The route serving the document."""
