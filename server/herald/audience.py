"""Audiences: which device subscribers a published message is for.

A publish may carry an ``audience``, a small boolean expression over device
tags and ids::

    {"tag": "toaster", "group": "device"}     the device has this tag in this group
    {"and": [a, b, ...]}, {"or": [a, b, ...]}  all / any of 1-100 sub-audiences
    {"not": a}                                 the device is not in ``a``
    {"device_id": "dev_..."}                   exactly this device

`parse_audience` validates one from a request and bounds its size, so that
`matches`, which runs once per device subscriber on the fan-out path, does no
checking of its own and cannot recurse deeply. No I/O here.
"""

from __future__ import annotations

from typing import Any

from herald.errors import BadRequest
from herald.models import Device
from herald.tags import DEFAULT_GROUP, NAME_RULE, is_tag_name

__all__ = [
    "MAX_DEPTH",
    "MAX_OPERANDS",
    "MAX_SELECTORS",
    "matches",
    "parse_audience",
    "visible",
]

MAX_DEPTH = 8
"""The most selectors on any path from the top of an audience down (a lone tag is 1)."""
MAX_OPERANDS = 100
"""The most sub-audiences one ``and`` or ``or`` holds."""
MAX_SELECTORS = 200
"""The most selectors (objects) in one audience, all levels together."""

_MAX_DEVICE_ID = 128
_FORMS = ("tag", "and", "or", "not", "device_id")
_FORM_LIST = ", ".join(repr(form) for form in _FORMS)


class _Parser:
    """One audience's validation: carries the selector count across the recursion."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.selectors = 0

    def parse(self, value: object, path: str, depth: int) -> dict[str, Any]:
        """Validate the selector ``value`` found at ``path``, ``depth`` levels down."""
        # Both limits are checked on the way in, so that a hostile input is refused
        # before it costs deep recursion or a walk over all of it.
        if depth > MAX_DEPTH:
            raise BadRequest(
                f"{path} is nested too deeply: an audience has at most {MAX_DEPTH} levels",
                path=path,
            )
        self.selectors += 1
        if self.selectors > MAX_SELECTORS:
            raise BadRequest(f"{self.root} holds at most {MAX_SELECTORS} selectors", path=self.root)
        if not isinstance(value, dict):
            raise BadRequest(f"{path} must be an object", path=path)
        forms = [form for form in _FORMS if form in value]
        if len(forms) != 1:
            raise BadRequest(f"{path} must have exactly one of {_FORM_LIST}", path=path)
        form = forms[0]
        allowed = ("tag", "group") if form == "tag" else (form,)
        unknown = sorted(str(key) for key in value if key not in allowed)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}", path=f"{path}.{unknown[0]}")

        operand = value[form]
        if form == "tag":
            group = value.get("group", DEFAULT_GROUP)
            for name, field in ((operand, "tag"), (group, "group")):
                if not is_tag_name(name):
                    raise BadRequest(f"{path}.{field} must be {NAME_RULE}", path=f"{path}.{field}")
            return {"tag": operand, "group": group}
        if form == "not":
            return {"not": self.parse(operand, f"{path}.not", depth + 1)}
        if form == "device_id":
            if not isinstance(operand, str) or not 0 < len(operand) <= _MAX_DEVICE_ID:
                raise BadRequest(
                    f"{path}.device_id must be a device id of 1-{_MAX_DEVICE_ID} characters",
                    path=f"{path}.device_id",
                )
            return {"device_id": operand}
        # "and" / "or"
        if not isinstance(operand, list) or not 0 < len(operand) <= MAX_OPERANDS:
            raise BadRequest(
                f"{path}.{form} must be a list of 1-{MAX_OPERANDS} audiences",
                path=f"{path}.{form}",
            )
        return {
            form: [
                self.parse(item, f"{path}.{form}[{index}]", depth + 1)
                for index, item in enumerate(operand)
            ]
        }


def parse_audience(value: object, path: str = "audience") -> dict[str, Any]:
    """Validate an audience; return it normalised (new objects, every tag with its group).

    Raises `BadRequest` whose ``path`` points at the fault, e.g. ``audience.and[1].tag``.
    Parsing the result again gives it back unchanged.
    """
    return _Parser(path).parse(value, path, 1)


def matches(audience: dict[str, Any], device: Device) -> bool:
    """Whether ``device`` is in ``audience`` (as `parse_audience` returns it).

    Trusts its input: parsing bounded the depth, so the recursion is shallow.
    """
    # Tags first: they are the leaves, so the most common selector by far.
    tag = audience.get("tag")
    if tag is not None:
        return tag in device.tags.get(audience["group"], ())
    operands = audience.get("and")
    if operands is not None:
        return all(matches(operand, device) for operand in operands)
    operands = audience.get("or")
    if operands is not None:
        return any(matches(operand, device) for operand in operands)
    negated = audience.get("not")
    if negated is not None:
        return not matches(negated, device)
    return bool(audience["device_id"] == device.id)


def visible(message_audience: dict[str, Any] | None, device: Device | None) -> bool:
    """Whether a subscriber sees a message.

    Subscribers that are not devices (``device`` None) see only messages without
    an audience: an audience is a choice of devices, which leaves them out. A
    device sees nothing while opted out; otherwise messages without an audience
    and those whose audience it matches.
    """
    if device is None:
        return message_audience is None
    if not device.opt_in:
        return False
    return message_audience is None or matches(message_audience, device)
