"""Device tag groups: validating them at registration and changing them later.

A device carries tag groups, ``{group: [tags]}``, that audiences select on.
Callers name their own groups; the groups whose name starts with ``herald_``
are kept by Herald from the device's own fields (timezone, locale), so that
an audience can target them and no caller can make them lie.

No I/O here: the API hands in request values and stores what comes back.
"""

from __future__ import annotations

import re
from typing import Any

from herald.errors import BadRequest

__all__ = [
    "DEFAULT_GROUP",
    "MAX_TAGS",
    "NAME_RULE",
    "RESERVED_PREFIX",
    "change_tags",
    "herald_groups",
    "is_tag_name",
    "parse_tags",
]

DEFAULT_GROUP = "device"
"""The group a plain list of tags goes to, and that an audience tag means by default."""
RESERVED_PREFIX = "herald_"
"""Groups starting with this are set by Herald itself, never by callers."""
MAX_TAGS = 100
"""The most tags one group holds."""
NAME_RULE = "1-128 characters without control characters"
"""What `is_tag_name` accepts, worded for error details."""

_MAX_NAME = 128
# C0, DEL and C1: invisible in logs and dashboards, and never meant as part of a name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_OPERATIONS = ("add", "remove", "set")


def is_tag_name(value: object) -> bool:
    """Whether ``value`` may name a tag or a tag group (reserved prefix aside)."""
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME and _CONTROL.search(value) is None


def _check_group_name(group: object, path: str) -> str:
    """Return ``group`` if callers may set a group of that name, else raise `BadRequest`."""
    if not is_tag_name(group):
        raise BadRequest(f"tag group name {group!r} must be {NAME_RULE}", path=path)
    assert isinstance(group, str)  # is_tag_name said so; this tells mypy
    if group.startswith(RESERVED_PREFIX):
        raise BadRequest(
            f"tag group {group!r} is reserved: groups starting with "
            f"{RESERVED_PREFIX!r} are set by Herald",
            path=path,
        )
    return group


def _check_tag_list(value: object, path: str) -> list[str]:
    """Return the tags of ``value`` with duplicates dropped, order kept, else raise `BadRequest`."""
    if not isinstance(value, list):
        raise BadRequest(f"{path} must be a list of tags", path=path)
    for index, tag in enumerate(value):
        if not is_tag_name(tag):
            raise BadRequest(
                f"{path}[{index}] must be a tag of {NAME_RULE}", path=f"{path}[{index}]"
            )
    tags = list(dict.fromkeys(value))
    # Counted after dropping duplicates: the limit is on what the group holds.
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"{path} holds at most {MAX_TAGS} tags", path=path)
    return tags


def parse_tags(value: object, path: str = "tags") -> dict[str, list[str]]:
    """Validate the tags given at registration.

    ``value`` is a list of tags (they go to the ``"device"`` group) or an object
    of groups. Anything invalid, a reserved group included, raises `BadRequest`
    with its path. Duplicates are dropped, order kept; empty groups are left out.
    """
    if isinstance(value, list):
        tags = _check_tag_list(value, path)
        return {DEFAULT_GROUP: tags} if tags else {}
    if not isinstance(value, dict):
        raise BadRequest(f"{path} must be a list of tags or an object of tag groups", path=path)
    groups: dict[str, list[str]] = {}
    for group, group_tags in value.items():
        group_path = f"{path}.{group}"
        name = _check_group_name(group, group_path)
        tags = _check_tag_list(group_tags, group_path)
        if tags:
            groups[name] = tags
    return groups


def change_tags(
    current: dict[str, list[str]], body: dict[str, Any]
) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """Apply a tags request to ``current`` (which is not mutated).

    ``body`` holds ``add``, ``remove`` or ``set``, each an object of groups;
    ``set`` does not go with the other two. Answers the new tags and the warnings.

    A group that is invalid (bad or reserved name, not a list of valid tags,
    more than 100 tags, or an ``add`` taking it past 100) is skipped and named
    in a warning ``{"path": "add.<group>", "detail": ...}``; the rest applies,
    so that one bad group does not throw away a batch of good ones. When no
    group is valid, raises `BadRequest` with the first invalid group's path
    (or the empty operation's).

    ``set`` replaces each named group (an empty list removes it). Otherwise
    ``remove`` applies before ``add``: a full group can swap tags in one request,
    and a tag in both ends up present. Groups left empty disappear; groups not
    named are untouched, the ``herald_*`` ones included.
    """
    for key in body:
        if key not in _OPERATIONS:
            raise BadRequest(f"unknown field {key!r}", path=str(key))
    if "set" in body and ("add" in body or "remove" in body):
        raise BadRequest("set cannot be combined with add or remove", path="set")
    if not body:
        raise BadRequest("a tags request needs add, remove or set")
    for operation, groups in body.items():
        if not isinstance(groups, dict):
            raise BadRequest(f"{operation} must be an object of tag groups", path=operation)

    # Every group gets its place in the body, so that warnings and "the first invalid group"
    # follow the request even though add's limit is only checked after remove is known.
    valid: dict[str, dict[str, list[str]]] = {operation: {} for operation in body}
    place: dict[str, int] = {}
    invalid: list[tuple[int, str, str]] = []  # (place, path, detail)
    for operation, groups in body.items():
        for group, value in groups.items():
            path = f"{operation}.{group}"
            place[path] = len(place)
            try:
                name = _check_group_name(group, path)
                valid[operation][name] = _check_tag_list(value, path)
            except BadRequest as error:
                invalid.append((place[path], path, error.detail))

    removed = valid.get("remove", {})
    for group, tags in list(valid.get("add", {}).items()):
        gone = set(removed.get(group, ()))
        kept = [tag for tag in current.get(group, ()) if tag not in gone]
        held = set(kept)
        if len(kept) + sum(tag not in held for tag in tags) > MAX_TAGS:
            del valid["add"][group]
            path = f"add.{group}"
            invalid.append((place[path], path, f"{path} would take the group past {MAX_TAGS} tags"))
    invalid.sort()

    if not any(valid.values()):
        if invalid:
            _, path, detail = invalid[0]
            raise BadRequest(detail, path=path)
        operation = next(iter(body))
        raise BadRequest(f"{operation} names no tag group", path=operation)

    result = {group: list(tags) for group, tags in current.items()}
    for group, tags in valid.get("set", {}).items():
        if tags:
            result[group] = tags
        else:
            result.pop(group, None)
    for group, tags in removed.items():
        if group in result:
            gone = set(tags)
            kept = [tag for tag in result[group] if tag not in gone]
            if kept:
                result[group] = kept
            else:
                del result[group]
    for group, tags in valid.get("add", {}).items():
        existing = result.get(group, [])
        held = set(existing)
        merged = existing + [tag for tag in tags if tag not in held]
        if merged:
            result[group] = merged

    warnings = [{"path": path, "detail": detail} for _, path, detail in invalid]
    return result, warnings


def herald_groups(
    timezone: str | None, locale_country: str | None, locale_language: str | None
) -> dict[str, list[str]]:
    """The reserved groups Herald keeps from a device's fields.

    ``herald_timezone``, ``herald_locale_country`` and ``herald_locale_language``,
    each holding its field's value; a group is absent when its field is unset.
    """
    fields = {
        "herald_timezone": timezone,
        "herald_locale_country": locale_country,
        "herald_locale_language": locale_language,
    }
    # An empty string counts as unset: it could never be a valid tag.
    return {group: [value] for group, value in fields.items() if value}
