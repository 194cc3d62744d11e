"""Validation of channel bodies (create and update) into `Channel` values. No I/O."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson

from herald.config import Settings
from herald.errors import BadRequest
from herald.models import ACL, CHANNEL_TYPES, Channel, check_name

__all__ = ["parse_channel", "parse_metadata", "payload_size", "update_channel"]

_FIELDS = {
    "name",
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
}


def _positive_int(body: dict[str, Any], name: str, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise BadRequest(f"{name} must be an integer from 1 to {maximum}", path=name)
    return value


def parse_channel(body: object, app: str, settings: Settings) -> Channel:
    """A new channel from a ``POST /v1/channels`` body; `BadRequest` names the bad field."""
    body = _object(body)
    channel = Channel(app=app, name=check_name(body.get("name"), "name"))
    kind = body.get("type", "default")
    if kind not in CHANNEL_TYPES:
        raise BadRequest("type must be 'default' or 'separate_rooms'", path="type")
    channel.type = kind
    _apply(channel, body, settings)
    return channel


def update_channel(channel: Channel, body: object, settings: Settings) -> None:
    """Apply a ``PUT``/``PATCH`` body to ``channel`` (only the fields given change).

    ``name`` and ``type`` are fixed at creation; an immutable ACL cannot change.
    Nothing is applied unless everything is valid.
    """
    body = _object(body)
    for fixed in ("name", "type"):
        if fixed in body and body[fixed] != getattr(channel, fixed):
            raise BadRequest(f"{fixed} is fixed when the channel is created", path=fixed)
    for name in ("readers", "writers", "editors"):
        acl: ACL = getattr(channel, name)
        if name in body and acl.immutable and ACL.parse(body[name], name) != acl:
            raise BadRequest(f"{name} is immutable", path=name)
    draft = Channel.from_record(channel.to_record())
    _apply(draft, body, settings, partial=True)
    for field in fields(Channel):
        setattr(channel, field.name, getattr(draft, field.name))


_ACLS = ("readers", "writers", "editors")


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", path=unknown[0])
    return body


def _apply(
    channel: Channel, body: dict[str, Any], settings: Settings, partial: bool = False
) -> None:
    if "description" in body or not partial:
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > 1024:
            raise BadRequest(
                "description must be a string of at most 1024 characters", path="description"
            )
        channel.description = description
    if "custom_publish" in body or not partial:
        custom_publish = body.get("custom_publish", False)
        if not isinstance(custom_publish, bool):
            raise BadRequest("custom_publish must be a boolean", path="custom_publish")
        channel.custom_publish = custom_publish
    for name in _ACLS:
        if name in body:
            setattr(channel, name, ACL.parse(body[name], name))
    if "annotations" in body:
        channel.annotations = parse_annotations(body["annotations"], settings)
    size = _positive_int(body, "history_size", settings.max_history_size)
    if size is not None:
        channel.history_size = size
    if "history_ttl" in body or not partial:
        channel.history_ttl = _positive_int(body, "history_ttl", 10 * 365 * 86400)
    if "idle_timeout" in body or not partial:
        channel.idle_timeout = _positive_int(body, "idle_timeout", 10 * 365 * 86400)


def parse_annotations(value: object, settings: Settings) -> list[dict[str, Any]]:
    """A list of ``{type, value}`` objects, bounded in total size."""
    if not isinstance(value, list):
        raise BadRequest("annotations must be a list", path="annotations")
    for i, item in enumerate(value):
        path = f"annotations[{i}]"
        if not isinstance(item, dict) or set(item) != {"type", "value"}:
            raise BadRequest("each annotation is an object with exactly type and value", path=path)
        if not isinstance(item["type"], str) or not 0 < len(item["type"]) <= 256:
            raise BadRequest(
                "annotation type must be a string of 1-256 characters", path=f"{path}.type"
            )
    if payload_size(value, "annotations") > settings.max_annotations_bytes:
        raise BadRequest(
            f"annotations are larger than {settings.max_annotations_bytes} bytes",
            path="annotations",
        )
    return value


def payload_size(value: object, path: str) -> int:
    """The size of ``value`` as JSON; `BadRequest` if JSON cannot carry it (bytes, huge ints,
    nesting too deep)."""
    try:
        if type(value) is str:
            return len(orjson.dumps(value))  # nothing nested: no envelope needed
        # Measured inside the deepest envelope the value is sent in (a batch publish answer,
        # {"data": [{"data": {"payload": ...}}]}): orjson writes at most 254 levels, and a
        # value it accepts alone but not inside its message would be stored, then fail to be
        # delivered. One dump, as before; the 8 bracket bytes are not the value's.
        return len(orjson.dumps([[[[value]]]])) - 8
    except TypeError:
        raise BadRequest(f"{path} holds a value JSON cannot represent", path=path) from None


def parse_metadata(value: object, settings: Settings) -> dict[str, Any] | None:
    """Optional message metadata: an object of bounded size."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("metadata must be an object", path="metadata")
    if payload_size(value, "metadata") > settings.max_metadata_bytes:
        raise BadRequest(
            f"metadata is larger than {settings.max_metadata_bytes} bytes", path="metadata"
        )
    return value
