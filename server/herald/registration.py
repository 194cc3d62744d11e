"""The body of ``POST /v1/devices``: validated into fields, then applied to a device. No I/O.

Registration is an upsert, so the fields a request leaves out keep their
stored value; ``identifiers`` given replace the stored ones whole (never a
merge), and ``tags`` given replace every group but Herald's own.
"""

from __future__ import annotations

import re
from typing import Any

from herald.errors import BadRequest
from herald.models import Device, now_rfc3339
from herald.tags import RESERVED_PREFIX, herald_groups, parse_tags

__all__ = ["apply_fields", "parse_registration", "parse_selector"]

_FIELDS = (
    "address",
    "platform",
    "opt_in",
    "tags",
    "timezone",
    "locale_country",
    "locale_language",
    "identifiers",
)
_PLATFORM = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_TIMEZONE = re.compile(r"[A-Za-z0-9_+\-/]{1,64}")
_COUNTRY = re.compile(r"[A-Za-z]{2}")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}")
_MAX_ADDRESS = 1024
_MAX_IDENTIFIERS = 100


def _address(value: object, path: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ADDRESS:
        raise BadRequest(f"{path} must be a string of 1-{_MAX_ADDRESS} characters", path=path)
    return value


def _platform(value: object, path: str) -> str:
    if not isinstance(value, str) or not _PLATFORM.fullmatch(value):
        raise BadRequest(
            f"{path} must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'", path=path
        )
    return value


def _optional(value: object, pattern: re.Pattern[str], path: str, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BadRequest(f"{path} must be {what}", path=path)
    return value


def _identifiers(value: object, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BadRequest(f"{path} must be an object of strings", path=path)
    if len(value) > _MAX_IDENTIFIERS:
        raise BadRequest(f"{path} holds at most {_MAX_IDENTIFIERS} entries", path=path)
    for name, item in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise BadRequest(f"{path} names must be 1-128 characters", path=path)
        if not isinstance(item, str) or len(item) > _MAX_ADDRESS:
            raise BadRequest(
                f"{path}.{name} must be a string of at most {_MAX_ADDRESS} characters",
                path=f"{path}.{name}",
            )
    return dict(value)


def parse_registration(body: object) -> dict[str, Any]:
    """The device fields a registration gives, validated; ``address`` and ``platform``
    are required. `BadRequest` with the path of the first field at fault."""
    if not isinstance(body, dict) or not isinstance(body.get("device"), dict):
        raise BadRequest("the body must be {device: {address, platform, ...}}", path="device")
    if len(body) > 1:
        unknown = sorted(k for k in body if k != "device")[0]
        raise BadRequest(f"unknown field {unknown!r}", path=unknown)
    device: dict[str, Any] = body["device"]
    unknown_fields = sorted(set(device) - set(_FIELDS))
    if unknown_fields:
        name = unknown_fields[0]
        raise BadRequest(f"unknown field {name!r}", path=f"device.{name}")
    fields: dict[str, Any] = {
        "address": _address(device.get("address"), "device.address"),
        "platform": _platform(device.get("platform"), "device.platform"),
    }
    if "opt_in" in device:
        if not isinstance(device["opt_in"], bool):
            raise BadRequest("device.opt_in must be a boolean", path="device.opt_in")
        fields["opt_in"] = device["opt_in"]
    if "tags" in device:
        fields["tags"] = parse_tags(device["tags"], "device.tags")
    if "timezone" in device:
        fields["timezone"] = _optional(
            device["timezone"], _TIMEZONE, "device.timezone", "a time zone name like 'Europe/Paris'"
        )
    if "locale_country" in device:
        country = _optional(
            device["locale_country"], _COUNTRY, "device.locale_country", "a two-letter country code"
        )
        fields["locale_country"] = country.upper() if country else None
    if "locale_language" in device:
        language = _optional(
            device["locale_language"],
            _LANGUAGE,
            "device.locale_language",
            "a two- or three-letter language code",
        )
        fields["locale_language"] = language.lower() if language else None
    if "identifiers" in device:
        fields["identifiers"] = _identifiers(device["identifiers"], "device.identifiers")
    return fields


def apply_fields(device: Device, fields: dict[str, Any]) -> None:
    """Set what a registration gave on ``device`` and refresh Herald's own tag groups."""
    for name in ("opt_in", "timezone", "locale_country", "locale_language", "identifiers"):
        if name in fields:
            setattr(device, name, fields[name])
    tags = fields.get("tags")
    if tags is None:
        tags = {g: t for g, t in device.tags.items() if not g.startswith(RESERVED_PREFIX)}
    device.tags = {
        **tags,
        **herald_groups(device.timezone, device.locale_country, device.locale_language),
    }
    device.updated_at = now_rfc3339()


def parse_selector(value: object, path: str) -> tuple[str | None, tuple[str, str] | None]:
    """How a request names one device: ``{device_id}`` or ``{address, platform}``;
    answers (device id, None) or (None, (platform, address))."""
    if not isinstance(value, dict):
        raise BadRequest(f"{path} must be {{device_id}} or {{address, platform}}", path=path)
    if "device_id" in value:
        if len(value) != 1:
            raise BadRequest(f"{path}: device_id goes alone", path=path)
        device_id = value["device_id"]
        if not isinstance(device_id, str) or not 0 < len(device_id) <= 128:
            raise BadRequest(f"{path}.device_id must be a device id", path=f"{path}.device_id")
        return device_id, None
    if set(value) != {"address", "platform"}:
        raise BadRequest(f"{path} must be {{device_id}} or {{address, platform}}", path=path)
    platform = _platform(value["platform"], f"{path}.platform")
    return None, (platform, _address(value["address"], f"{path}.address"))
