"""The building blocks of the OpenAPI document and its component schemas.

See `herald.openapi` for what the document promises; the paths are in
`herald.openapi_paths`.
"""

from __future__ import annotations

from typing import Any

from herald.audience import MAX_DEPTH, MAX_OPERANDS, MAX_SELECTORS
from herald.auth import CHANNEL_KEYS, SCOPES
from herald.config import Settings
from herald.models import CHANNEL_TYPES
from herald.tags import DEFAULT_GROUP, MAX_TAGS, RESERVED_PREFIX

__all__ = [
    "BOOLEAN",
    "JSON",
    "MAX_BATCH",
    "MAX_HISTORY",
    "MAX_PAGE",
    "MAX_TIMEOUT_MS",
    "MAX_TOKEN_TTL",
    "MSGPACK",
    "TIMESTAMP",
    "Schema",
    "integer",
    "obj",
    "ref",
    "schemas",
    "string",
]

Schema = dict[str, Any]
"""One JSON Schema (or any other object of the document)."""

JSON = "application/json"
"""The media type of JSON bodies and answers."""
MSGPACK = "application/msgpack"
"""The media type of MessagePack bodies and answers."""
_NAME_PATTERN = "^[A-Za-z0-9_.:-]{1,128}$"  # herald.models.check_name
_OFFSET_PATTERN = "^[0-9]{1,20}-[0-9]{1,20}$"  # herald.models.parse_offset
_TAG_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"  # herald.tags.is_tag_name
_MAX_TTL = 10 * 365 * 86400  # history_ttl and idle_timeout (herald.channels)
MAX_TOKEN_TTL = 30 * 86400
"""Longest user-token lifetime, seconds (`herald.identity`)."""
MAX_TIMEOUT_MS = 60_000
"""Longest device-command timeout (`herald.commands`)."""
MAX_PAGE = 200
"""Largest page of a listing (`herald.api`)."""
MAX_HISTORY = 1000
"""Most messages one history request returns (`herald.api`)."""
MAX_BATCH = 1000
"""Most items in one batch publish (`herald.api`)."""


def ref(name: str) -> Schema:
    """A reference to the named component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(
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


def string(
    min_length: int | None = None,
    max_length: int | None = None,
    pattern: str | None = None,
    description: str | None = None,
) -> Schema:
    """A string schema with the bounds given."""
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


def integer(minimum: int, maximum: int, description: str | None = None) -> Schema:
    """An integer schema within ``minimum`` and ``maximum``."""
    schema: Schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


BOOLEAN: Schema = {"type": "boolean"}
"""A boolean schema."""
TIMESTAMP = string(description="RFC 3339, UTC, microseconds.")
"""The schema of every timestamp the API answers with."""
TIMESTAMP["format"] = "date-time"


def schemas(settings: Settings) -> dict[str, Schema]:
    """The named schemas of the document."""
    max_payload = settings.max_payload_bytes
    name = string(1, 128, _NAME_PATTERN, "1-128 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'.")
    tag_name = string(1, 128, _TAG_PATTERN, "1-128 characters without control characters.")
    tag_list: Schema = {
        "type": "array",
        "items": ref("TagName"),
        "description": f"At most {MAX_TAGS} distinct tags (duplicates are dropped, order kept).",
    }
    group_name = string(
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
        "public": BOOLEAN,
        "any_user": BOOLEAN,
        "user_ids": {
            "type": "array",
            "items": string(1, 128),
            "maxItems": 1000,
            "description": "User ids (duplicates are dropped).",
        },
        "immutable": BOOLEAN,
    }
    room = _nullable(
        string(
            max_length=128,
            pattern="^[A-Za-z0-9_.:-]*$",
            description=(
                "The room: required (a name) on `separate_rooms` channels, "
                "absent, null or empty on others."
            ),
        )
    )
    ttl = _nullable(integer(1, _MAX_TTL, "Seconds; null for none."))
    annotations: Schema = {
        "type": "array",
        "items": ref("Annotation"),
        "description": f"At most {settings.max_annotations_bytes} bytes as JSON, all together.",
    }
    channel_settings: dict[str, Schema] = {
        "description": string(max_length=1024),
        "custom_publish": {
            "type": "boolean",
            "description": "Whether users (and devices) may publish, as `writers` allows.",
        },
        "readers": ref("ACLInput"),
        "writers": ref("ACLInput"),
        "editors": ref("ACLInput"),
        "annotations": annotations,
        "history_size": _nullable(
            integer(1, settings.max_history_size, "Messages kept per topic; null keeps it.")
        ),
        "history_ttl": ttl,
        "idle_timeout": {
            **ttl,
            "description": "Seconds without a publish after which the channel closes itself.",
        },
    }
    key_record = obj(
        {
            "id": string(),
            "scopes": {
                "type": "array",
                "items": {"enum": [*SCOPES, *CHANNEL_KEYS]},
                "minItems": 1,
                "description": "App key scopes; a channel key (deletable here) has one of "
                "its kind.",
            },
            "name": string(),
            "created_at": TIMESTAMP,
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
        "audience": {"oneOf": [ref("Audience"), {"type": "null"}]},
    }
    channel = obj(
        {
            "name": ref("Name"),
            "id": string(),
            "description": string(),
            "type": {"enum": list(CHANNEL_TYPES)},
            "custom_publish": BOOLEAN,
            "readers": ref("ACL"),
            "writers": ref("ACL"),
            "editors": ref("ACL"),
            "annotations": {"type": "array", "items": ref("Annotation")},
            "history_size": {"type": "integer", "minimum": 1},
            "history_ttl": {"type": ["integer", "null"], "minimum": 1},
            "idle_timeout": {"type": ["integer", "null"], "minimum": 1},
            "owner": {"oneOf": [ref("Author"), {"type": "null"}]},
            "is_inactive": BOOLEAN,
            "created_at": TIMESTAMP,
            "counts": obj(
                {
                    "messages": {"type": "integer", "minimum": 0},
                    "subscribers": {"type": "integer", "minimum": 0},
                    "connections": {"type": "integer", "minimum": 0},
                },
                ("messages", "subscribers", "connections"),
            ),
            "you_can_edit": {**BOOLEAN, "description": "For user tokens only."},
            "you_subscribed": {**BOOLEAN, "description": "For user tokens only."},
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
    selector_by_id = obj({"device_id": string(1, 128)}, ("device_id",))
    selector_by_address = obj(
        {"address": ref("DeviceAddress"), "platform": ref("Platform")},
        ("address", "platform"),
    )
    return {
        "Name": name,
        "MessageId": string(
            pattern=_OFFSET_PATTERN,
            description="A message id: `<milliseconds>-<sequence>`, sorting in publish order.",
        ),
        "TagName": tag_name,
        "TagGroups": groups,
        "Platform": string(1, 64, "^[A-Za-z0-9_.:-]{1,64}$"),
        "DeviceAddress": string(1, 1024),
        "Error": obj(
            {
                "detail": string(description="What went wrong, for people."),
                "code": string(description="What went wrong, for programs."),
                "path": string(description="The field at fault, when there is one."),
            },
            ("detail", "code"),
        ),
        "Warning": obj({"path": string(), "detail": string()}, ("path", "detail")),
        "Author": obj(
            {"type": {"enum": ["key", "user", "device"]}, "id": string()}, ("type", "id")
        ),
        "ACLInput": obj(acl_fields, description="Who may do something; omitted flags are false."),
        "ACL": obj(acl_fields, ("public", "any_user", "user_ids", "immutable")),
        "Annotation": obj(
            {"type": string(1, 256), "value": {"description": "Any JSON value."}},
            ("type", "value"),
        ),
        "ChannelCreate": obj(
            {
                "name": ref("Name"),
                "type": {"enum": list(CHANNEL_TYPES), "default": "default"},
                **channel_settings,
            },
            ("name",),
        ),
        "ChannelUpdate": obj(
            {
                "name": {**ref("Name"), "description": "Fixed: only the current name."},
                "type": {
                    "enum": list(CHANNEL_TYPES),
                    "description": "Fixed: only the current type.",
                },
                **channel_settings,
            },
            description="Only the fields given change; an immutable ACL cannot change.",
        ),
        "Channel": channel,
        "CreatedChannel": obj(
            {
                **channel["properties"],
                "keys": obj(
                    {kind: string() for kind in CHANNEL_KEYS},
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
                obj(
                    {
                        "tag": ref("TagName"),
                        "group": {**ref("TagName"), "default": DEFAULT_GROUP},
                    },
                    ("tag",),
                ),
                *(
                    obj(
                        {
                            form: {
                                "type": "array",
                                "items": ref("Audience"),
                                "minItems": 1,
                                "maxItems": MAX_OPERANDS,
                            }
                        },
                        (form,),
                    )
                    for form in ("and", "or")
                ),
                obj({"not": ref("Audience")}, ("not",)),
                obj({"device_id": string(1, 128)}, ("device_id",)),
            ],
        },
        "PublishRequest": obj(publish, ("payload",)),
        "PublishItem": obj({"channel": ref("Name"), **publish}, ("channel", "payload")),
        "Message": obj(
            {
                "id": ref("MessageId"),
                "channel": ref("Name"),
                "room": string(description="Empty on channels without rooms."),
                "payload": {"description": "The published JSON value."},
                "author": ref("Author"),
                "created_at": TIMESTAMP,
                "action": {"const": "custom"},
                "metadata": {"type": ["object", "null"]},
                "links": obj({"self": string()}, ("self",)),
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
                obj({"status": {"const": 201}, "data": ref("Message")}, ("status", "data")),
                obj({"status": {"const": 201}, "data": ref("Published")}, ("status", "data")),
                obj(
                    {"status": integer(400, 599), "error": ref("Error")},
                    ("status", "error"),
                ),
            ]
        },
        "Published": obj(
            {"id": ref("MessageId")},
            ("id",),
            description="A published message's id alone (`Prefer: return=minimal`).",
        ),
        "App": obj({"name": ref("Name"), "created_at": TIMESTAMP}, ("name", "created_at")),
        "Key": key_record,
        "NewKey": obj(
            {**key_record["properties"], "key": string(description="The secret, shown once.")},
            (*key_record["required"], "key"),
        ),
        "DeviceFields": obj(
            {
                "address": ref("DeviceAddress"),
                "platform": ref("Platform"),
                "opt_in": BOOLEAN,
                "tags": {
                    "description": f"A list (the {DEFAULT_GROUP!r} group) or tag groups; "
                    "replaces every group but Herald's own.",
                    "oneOf": [tag_list, ref("TagGroups")],
                },
                "timezone": _nullable(string(pattern="^[A-Za-z0-9_+/-]{1,64}$")),
                "locale_country": _nullable(string(pattern="^[A-Za-z]{2}$")),
                "locale_language": _nullable(string(pattern="^[A-Za-z]{2,3}$")),
                "identifiers": {
                    "type": "object",
                    "maxProperties": 100,
                    "propertyNames": string(1, 128),
                    "additionalProperties": string(max_length=1024),
                    "description": "Replaces the stored identifiers whole.",
                },
            },
            ("address", "platform"),
        ),
        "Device": obj(
            {
                "device_id": string(),
                "address": string(),
                "platform": string(),
                "opt_in": BOOLEAN,
                "tags": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": string()},
                },
                "timezone": {"type": ["string", "null"]},
                "locale_country": {"type": ["string", "null"]},
                "locale_language": {"type": ["string", "null"]},
                "identifiers": {"type": "object", "additionalProperties": string()},
                "created_at": TIMESTAMP,
                "updated_at": TIMESTAMP,
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
            **obj(
                {
                    "device_id": ref("Name"),
                    "connection_key": string(),
                    "room": room,
                },
                description="The device: exactly one of `device_id` and `connection_key`.",
            ),
            "oneOf": [{"required": ["device_id"]}, {"required": ["connection_key"]}],
        },
        "SubscriberEntry": obj(
            {
                "type": {"const": "device"},
                "device_id": string(),
                "room": string(),
                "active": {
                    "type": "boolean",
                    "description": "Connected to a live worker and opted in.",
                },
            },
            ("type", "device_id", "room", "active"),
        ),
    }
