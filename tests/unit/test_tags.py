"""Device tag groups: registration tags, tag changes with warnings, Herald's own groups."""

from __future__ import annotations

import copy
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herald.errors import BadRequest
from herald.tags import (
    DEFAULT_GROUP,
    MAX_TAGS,
    RESERVED_PREFIX,
    change_tags,
    herald_groups,
    is_tag_name,
    parse_tags,
)

NAME_RULE = "1-128 characters without control characters"
BAD_NAMES: list[object] = ["", "x" * 129, None, 5, ["a"], "a\nb", "\x00", "a\x7f", "\x9f", "\t"]


def many(count: int, prefix: str = "t") -> list[str]:
    """``count`` distinct tags."""
    return [f"{prefix}{i}" for i in range(count)]


def parse_error(value: object, path: str = "tags") -> BadRequest:
    """The error parsing ``value`` raises (failing the test when there is none)."""
    with pytest.raises(BadRequest) as error:
        parse_tags(value, path)
    assert error.value.status == 400
    return error.value


def change_error(current: dict[str, list[str]], body: dict[str, Any]) -> BadRequest:
    """The error applying ``body`` raises (failing the test when there is none)."""
    with pytest.raises(BadRequest) as error:
        change_tags(current, body)
    assert error.value.status == 400
    return error.value


def test_constants() -> None:
    assert DEFAULT_GROUP == "device"
    assert RESERVED_PREFIX == "herald_"
    assert MAX_TAGS == 100


@pytest.mark.parametrize("name", ["a", "x" * 128, "é", "with space", "Europe/Paris", "🙂"])
def test_is_tag_name_accepts_short_text(name: str) -> None:
    assert is_tag_name(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_is_tag_name_rejects(name: object) -> None:
    assert not is_tag_name(name)


# parse_tags


def test_a_list_is_the_device_group() -> None:
    assert parse_tags(["toaster", "kitchen"]) == {"device": ["toaster", "kitchen"]}


def test_an_object_is_groups() -> None:
    assert parse_tags({"device": ["a"], "room": ["hall", "b"]}) == {
        "device": ["a"],
        "room": ["hall", "b"],
    }


def test_duplicates_dropped_order_kept() -> None:
    assert parse_tags(["b", "a", "b", "c", "a"]) == {"device": ["b", "a", "c"]}
    assert parse_tags({"g": ["y", "y", "x"]}) == {"g": ["y", "x"]}


def test_empty_groups_are_left_out() -> None:
    assert parse_tags([]) == {}
    assert parse_tags({}) == {}
    assert parse_tags({"g": [], "h": ["a"]}) == {"h": ["a"]}


def test_parse_copies_its_input() -> None:
    raw = {"g": ["a"]}
    parse_tags(raw)["g"].append("b")
    assert raw == {"g": ["a"]}


def test_group_limit_counts_distinct_tags() -> None:
    assert parse_tags(many(MAX_TAGS)) == {"device": many(MAX_TAGS)}
    assert parse_tags({"g": many(MAX_TAGS) * 2}) == {"g": many(MAX_TAGS)}


@pytest.mark.parametrize(
    ("value", "path"),
    [(many(MAX_TAGS + 1), "tags"), ({"g": many(MAX_TAGS + 1)}, "tags.g")],
)
def test_more_than_100_tags_in_a_group(value: object, path: str) -> None:
    error = parse_error(value)
    assert error.path == path
    assert error.detail == f"{path} holds at most 100 tags"


@pytest.mark.parametrize("value", [None, "toaster", 5, True, ("a",)])
def test_tags_must_be_a_list_or_an_object(value: object) -> None:
    error = parse_error(value)
    assert error.path == "tags"
    assert error.detail == "tags must be a list of tags or an object of tag groups"


@pytest.mark.parametrize("tag", BAD_NAMES)
def test_bad_tag_in_a_list(tag: object) -> None:
    error = parse_error(["ok", tag])
    assert error.path == "tags[1]"
    assert error.detail == f"tags[1] must be a tag of {NAME_RULE}"


@pytest.mark.parametrize("tag", BAD_NAMES)
def test_bad_tag_in_a_group(tag: object) -> None:
    error = parse_error({"g": [tag]})
    assert error.path == "tags.g[0]"


@pytest.mark.parametrize("value", [None, "a", {"a": 1}, 5])
def test_group_value_must_be_a_list(value: object) -> None:
    error = parse_error({"ok": ["a"], "g": value})
    assert error.path == "tags.g"
    assert error.detail == "tags.g must be a list of tags"


@pytest.mark.parametrize("group", ["", "x" * 129, "a\nb", "\x1b[31m"])
def test_bad_group_name(group: str) -> None:
    error = parse_error({group: ["a"]})
    assert error.path == f"tags.{group}"
    assert error.detail == f"tag group name {group!r} must be {NAME_RULE}"


@pytest.mark.parametrize("group", ["herald_timezone", "herald_", "herald_anything"])
def test_reserved_groups_are_refused(group: str) -> None:
    error = parse_error({"device": ["a"], group: ["x"]})
    assert error.path == f"tags.{group}"
    assert error.detail == (
        f"tag group {group!r} is reserved: groups starting with 'herald_' are set by Herald"
    )


def test_reserved_prefix_is_case_sensitive_and_a_prefix_only() -> None:
    assert parse_tags({"Herald_x": ["a"], "my_herald_x": ["b"]}) == {
        "Herald_x": ["a"],
        "my_herald_x": ["b"],
    }


def test_parse_path_prefix_is_the_callers() -> None:
    assert parse_error({"g": [""]}, path="devices[3].tags").path == "devices[3].tags.g[0]"


# change_tags: whole-request errors


def test_unknown_field_is_named() -> None:
    error = change_error({}, {"add": {"g": ["a"]}, "replace": {}})
    assert error.path == "replace"
    assert error.detail == "unknown field 'replace'"


@pytest.mark.parametrize("other", ["add", "remove"])
def test_set_does_not_go_with_add_or_remove(other: str) -> None:
    error = change_error({}, {other: {"g": ["a"]}, "set": {"h": ["b"]}})
    assert error.path == "set"
    assert error.detail == "set cannot be combined with add or remove"


def test_an_operation_is_required() -> None:
    error = change_error({"g": ["a"]}, {})
    assert error.path is None
    assert error.detail == "a tags request needs add, remove or set"


@pytest.mark.parametrize("operation", ["add", "remove", "set"])
@pytest.mark.parametrize("value", [None, ["a"], "g", 1])
def test_operations_must_be_objects(operation: str, value: object) -> None:
    error = change_error({}, {operation: value})
    assert error.path == operation
    assert error.detail == f"{operation} must be an object of tag groups"


def test_operations_are_checked_before_groups() -> None:
    assert change_error({}, {"add": {"g": ["a"]}, "remove": []}).path == "remove"


@pytest.mark.parametrize("operation", ["add", "remove", "set"])
def test_an_operation_naming_no_group(operation: str) -> None:
    error = change_error({"g": ["a"]}, {operation: {}})
    assert error.path == operation
    assert error.detail == f"{operation} names no tag group"


def test_the_first_empty_operation_is_named() -> None:
    assert change_error({}, {"remove": {}, "add": {}}).path == "remove"


# change_tags: invalid groups, skipped with a warning or (when nothing is valid) an error


INVALID_GROUPS: list[tuple[str, object, str]] = [
    # (group, value, detail for it under "add")
    ("herald_timezone", ["UTC"], "tag group 'herald_timezone' is reserved"),
    ("", ["a"], f"tag group name '' must be {NAME_RULE}"),
    ("x" * 129, ["a"], f"tag group name {'x' * 129!r} must be {NAME_RULE}"),
    ("a\nb", ["a"], f"tag group name 'a\\nb' must be {NAME_RULE}"),
    ("g", "a", "add.g must be a list of tags"),
    ("g", None, "add.g must be a list of tags"),
    ("g", {"a": 1}, "add.g must be a list of tags"),
    ("g", ["a", ""], f"add.g[1] must be a tag of {NAME_RULE}"),
    ("g", ["a", 5], f"add.g[1] must be a tag of {NAME_RULE}"),
    ("g", ["x" * 129], f"add.g[0] must be a tag of {NAME_RULE}"),
    ("g", many(MAX_TAGS + 1), "add.g holds at most 100 tags"),
]


@pytest.mark.parametrize(("group", "value", "detail"), INVALID_GROUPS)
def test_invalid_group_is_skipped_with_a_warning(group: str, value: object, detail: str) -> None:
    current = {"device": ["a"], "herald_timezone": ["Europe/Paris"]}
    tags, warnings = change_tags(current, {"add": {group: value, "ok": ["b"]}})
    assert tags == {"device": ["a"], "herald_timezone": ["Europe/Paris"], "ok": ["b"]}
    assert len(warnings) == 1
    assert warnings[0]["path"] == f"add.{group}"
    assert warnings[0]["detail"].startswith(detail)


@pytest.mark.parametrize(("group", "value", "detail"), INVALID_GROUPS)
def test_only_invalid_groups_is_an_error(group: str, value: object, detail: str) -> None:
    error = change_error({"device": ["a"]}, {"add": {group: value}})
    assert error.path == f"add.{group}"
    assert error.detail.startswith(detail)


@pytest.mark.parametrize("operation", ["remove", "set"])
def test_invalid_groups_under_remove_and_set(operation: str) -> None:
    current = {"g": ["a", "b"], "herald_timezone": ["UTC"]}
    body = {operation: {"herald_timezone": [], "g": ["a"], "h": [1]}}
    tags, warnings = change_tags(current, body)
    assert tags["herald_timezone"] == ["UTC"]
    assert [w["path"] for w in warnings] == [f"{operation}.herald_timezone", f"{operation}.h"]
    assert warnings[1]["detail"] == f"{operation}.h[0] must be a tag of {NAME_RULE}"


def test_the_first_invalid_group_is_the_error() -> None:
    error = change_error({}, {"remove": {"g": [""]}, "add": {"herald_x": ["a"], "h": 1}})
    assert error.path == "remove.g"


def test_warnings_follow_the_request_order() -> None:
    current = {"full": many(MAX_TAGS)}
    body = {
        "remove": {"r": [""], "ok": ["a"]},
        "add": {"full": ["new"], "bad": 5, "ok": ["b"], "herald_x": ["y"]},
    }
    tags, warnings = change_tags(current, body)
    assert tags == {"full": many(MAX_TAGS), "ok": ["b"]}
    assert [w["path"] for w in warnings] == ["remove.r", "add.full", "add.bad", "add.herald_x"]


def test_an_empty_operation_beside_a_valid_one_is_fine() -> None:
    assert change_tags({}, {"add": {}, "remove": {"g": ["a"]}}) == ({}, [])


# change_tags: the group limit under add


def test_add_up_to_the_limit() -> None:
    current = {"g": many(MAX_TAGS - 2)}
    tags, warnings = change_tags(current, {"add": {"g": ["x", "y", "t0"]}})
    assert tags == {"g": [*many(MAX_TAGS - 2), "x", "y"]}
    assert warnings == []


def test_add_past_the_limit_is_skipped() -> None:
    current = {"g": many(MAX_TAGS - 2), "h": ["a"]}
    tags, warnings = change_tags(current, {"add": {"g": ["x", "y", "z"], "h": ["b"]}})
    assert tags == {"g": many(MAX_TAGS - 2), "h": ["a", "b"]}
    assert warnings == [{"path": "add.g", "detail": "add.g would take the group past 100 tags"}]


def test_add_past_the_limit_alone_is_an_error() -> None:
    error = change_error({"g": many(MAX_TAGS)}, {"add": {"g": ["new"]}})
    assert error.path == "add.g"
    assert error.detail == "add.g would take the group past 100 tags"


def test_adding_tags_already_there_to_a_full_group_is_fine() -> None:
    assert change_tags({"g": many(MAX_TAGS)}, {"add": {"g": ["t5", "t7"]}}) == (
        {"g": many(MAX_TAGS)},
        [],
    )


def test_remove_makes_room_for_add_in_the_same_request() -> None:
    current = {"g": many(MAX_TAGS)}
    tags, warnings = change_tags(current, {"remove": {"g": ["t0", "t1"]}, "add": {"g": ["x", "y"]}})
    assert tags == {"g": [*many(MAX_TAGS)[2:], "x", "y"]}
    assert warnings == []


def test_an_invalid_remove_makes_no_room() -> None:
    current = {"g": many(MAX_TAGS)}
    body = {"remove": {"g": ["t0", ""]}, "add": {"g": ["x"], "h": ["a"]}}
    tags, warnings = change_tags(current, body)
    assert tags == {"g": many(MAX_TAGS), "h": ["a"]}
    assert [w["path"] for w in warnings] == ["remove.g", "add.g"]


def test_set_with_more_than_100_tags_is_skipped() -> None:
    tags, warnings = change_tags({}, {"set": {"g": many(MAX_TAGS + 1), "h": ["a"]}})
    assert tags == {"h": ["a"]}
    assert warnings == [{"path": "set.g", "detail": "set.g holds at most 100 tags"}]


# change_tags: what each operation does


def test_set_replaces_named_groups_only() -> None:
    current = {"a": ["1", "2"], "b": ["3"], "herald_timezone": ["UTC"]}
    tags, warnings = change_tags(current, {"set": {"a": ["9", "1", "9"], "c": ["4"]}})
    assert tags == {"a": ["9", "1"], "b": ["3"], "herald_timezone": ["UTC"], "c": ["4"]}
    assert warnings == []


def test_set_with_an_empty_list_removes_the_group() -> None:
    tags, _ = change_tags({"a": ["1"], "b": ["2"]}, {"set": {"a": [], "missing": []}})
    assert tags == {"b": ["2"]}


def test_add_appends_missing_tags_in_order() -> None:
    tags, _ = change_tags({"g": ["a", "b"]}, {"add": {"g": ["c", "a", "d", "c"], "new": ["x"]}})
    assert tags == {"g": ["a", "b", "c", "d"], "new": ["x"]}


def test_add_of_nothing_to_a_new_group_adds_no_group() -> None:
    assert change_tags({"g": ["a"]}, {"add": {"h": []}}) == ({"g": ["a"]}, [])


def test_remove_drops_tags_and_empty_groups() -> None:
    current = {"g": ["a", "b", "c"], "h": ["x"], "k": ["y"]}
    tags, warnings = change_tags(current, {"remove": {"g": ["b", "zz"], "h": ["x"], "no": ["q"]}})
    assert tags == {"g": ["a", "c"], "k": ["y"]}
    assert warnings == []


def test_a_tag_both_removed_and_added_stays() -> None:
    tags, _ = change_tags({"g": ["a", "b"]}, {"add": {"g": ["a"]}, "remove": {"g": ["a"]}})
    assert tags == {"g": ["b", "a"]}


def test_group_order_is_kept() -> None:
    current = {"a": ["1"], "b": ["2"], "c": ["3"]}
    tags, _ = change_tags(current, {"add": {"b": ["4"], "d": ["5"]}, "remove": {"a": ["9"]}})
    assert list(tags) == ["a", "b", "c", "d"]


def test_result_shares_no_list_with_current() -> None:
    current = {"g": ["a"], "h": ["b"]}
    tags, _ = change_tags(current, {"add": {"g": ["c"]}})
    tags["h"].append("z")
    assert current == {"g": ["a"], "h": ["b"]}


# herald_groups


def test_herald_groups_from_all_fields() -> None:
    assert herald_groups("Europe/Paris", "FR", "fr") == {
        "herald_timezone": ["Europe/Paris"],
        "herald_locale_country": ["FR"],
        "herald_locale_language": ["fr"],
    }


def test_herald_groups_leave_out_unset_fields() -> None:
    assert herald_groups(None, None, None) == {}
    assert herald_groups(None, "DE", None) == {"herald_locale_country": ["DE"]}
    assert herald_groups("UTC", None, "") == {"herald_timezone": ["UTC"]}


def test_herald_groups_are_reserved() -> None:
    groups = herald_groups("UTC", "GB", "en")
    assert all(group.startswith(RESERVED_PREFIX) for group in groups)
    error = change_error({}, {"set": groups})
    assert error.path == "set.herald_timezone"


# Properties. Small pools, so that random requests hit existing groups and tags.

GROUPS = ["device", "g", "h", "k"]
TAGS = ["a", "b", "c", "d", "e", "f"]

# Any valid name: control characters are exactly Unicode's Cc; Cs cannot be encoded anyway.
names = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=128)
group_tags = st.lists(st.sampled_from(TAGS), min_size=1, max_size=len(TAGS), unique=True)
currents = st.dictionaries(st.sampled_from([*GROUPS, "herald_timezone"]), group_tags)
valid_requests = st.dictionaries(
    st.sampled_from(GROUPS), st.lists(st.sampled_from(TAGS), max_size=8), max_size=4
)
# Values that make a group invalid whatever its name.
bad_values = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.sampled_from(TAGS), min_size=1).map(lambda tags: [*tags, ""]),
    st.just(many(MAX_TAGS + 1)),
)
bad_names = st.one_of(
    st.sampled_from(["", "x" * 129, "a\nb", "\x7f"]),
    st.text(min_size=1, max_size=5).map(lambda name: RESERVED_PREFIX + name),
)


def apply(current: dict[str, list[str]], body: dict[str, dict[str, list[str]]]) -> Any:
    """A plain model of a valid request, tag by tag (no group can reach 100 here)."""
    tags = {group: list(values) for group, values in current.items()}
    for group, values in body.get("set", {}).items():
        tags[group] = list(dict.fromkeys(values))
    for group, values in body.get("remove", {}).items():
        tags[group] = [tag for tag in tags.get(group, []) if tag not in values]
    for group, values in body.get("add", {}).items():
        for tag in values:
            if tag not in tags.setdefault(group, []):
                tags[group].append(tag)
    return {group: values for group, values in tags.items() if values}


def bodies(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Requests: set alone, or add and/or remove, with groups drawn from ``valid``."""
    return st.one_of(
        st.fixed_dictionaries({"set": valid}),
        st.fixed_dictionaries({"add": valid}),
        st.fixed_dictionaries({"remove": valid}),
        st.fixed_dictionaries({"remove": valid, "add": valid}),
        st.fixed_dictionaries({"add": valid, "remove": valid}),
    )


def check_tags(tags: dict[str, list[str]]) -> None:
    """Every group is named validly and holds 1-100 distinct valid tags."""
    for group, values in tags.items():
        assert is_tag_name(group)
        assert 1 <= len(values) <= MAX_TAGS
        assert len(set(values)) == len(values)
        assert all(is_tag_name(tag) for tag in values)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=130))
def test_is_tag_name_is_length_and_no_control_characters(text: str) -> None:
    expected = 1 <= len(text) <= 128 and all(unicodedata.category(c) != "Cc" for c in text)
    assert is_tag_name(text) == expected


@settings(max_examples=60, deadline=None)
@given(current=currents, body=bodies(valid_requests))
def test_valid_requests_follow_the_model(
    current: dict[str, list[str]], body: dict[str, Any]
) -> None:
    if not any(body.values()):
        return  # no group at all: an error, tested on its own
    before = copy.deepcopy((current, body))
    tags, warnings = change_tags(current, body)
    assert (current, body) == before
    assert warnings == []
    assert tags == apply(current, body)
    check_tags(tags)
    # No herald_ group is added, changed or dropped by a request.
    assert {g: v for g, v in tags.items() if g.startswith(RESERVED_PREFIX)} == {
        g: v for g, v in current.items() if g.startswith(RESERVED_PREFIX)
    }


@settings(max_examples=60, deadline=None)
@given(
    current=currents,
    operation=st.sampled_from(["add", "remove", "set"]),
    good=valid_requests.filter(bool),
    bad=st.dictionaries(
        st.sampled_from(["k2", "k3"]) | bad_names,
        bad_values,
        min_size=1,
        max_size=3,
    ),
    data=st.data(),
)
def test_mixed_requests_apply_the_valid_groups_and_warn_the_invalid(
    current: dict[str, list[str]],
    operation: str,
    good: dict[str, list[str]],
    bad: dict[str, object],
    data: st.DataObject,
) -> None:
    # A bad name spoils the group whatever its value; fix those values to be fine lists.
    bad = {g: (["a"] if g not in ("k2", "k3") else v) for g, v in bad.items()}
    mixed = list(good.items()) + list(bad.items())
    order = data.draw(st.permutations(range(len(mixed))))
    body = {operation: {mixed[i][0]: mixed[i][1] for i in order}}
    before = copy.deepcopy((current, body))

    tags, warnings = change_tags(current, body)

    assert (current, body) == before
    assert tags == change_tags(current, {operation: good})[0]
    assert [w["path"] for w in warnings] == [
        f"{operation}.{mixed[i][0]}" for i in order if mixed[i][0] in bad
    ]
    check_tags(tags)


@settings(max_examples=50, deadline=None)
@given(
    current=currents,
    group=st.sampled_from(GROUPS),
    added=st.lists(names.map(lambda t: "new-" + t[:100]), max_size=5),
)
def test_add_then_remove_restores(
    current: dict[str, list[str]], group: str, added: list[str]
) -> None:
    after_add, warnings = change_tags(current, {"add": {group: added}})
    assert warnings == []
    assert all(tag in after_add[group] for tag in added)
    restored, warnings = change_tags(after_add, {"remove": {group: added}})
    assert warnings == []
    assert restored == current


@settings(max_examples=60, deadline=None)
@given(
    current=currents,
    group=st.sampled_from(GROUPS),
    # Near-full groups often, so that the boundary itself is tried.
    size=st.integers(min_value=0, max_value=MAX_TAGS)
    | st.integers(min_value=95, max_value=MAX_TAGS),
    removed=st.integers(min_value=0, max_value=4),
    extra=st.integers(min_value=0, max_value=6),
    again=st.booleans(),
)
def test_add_respects_the_limit_after_remove(
    current: dict[str, list[str]], group: str, size: int, removed: int, extra: int, again: bool
) -> None:
    current = {g: v for g, v in current.items() if g != group}
    if size:
        current[group] = many(size)
    removed = min(removed, size)
    kept = many(size)[removed:]
    # Tags the group holds already do not count again.
    added = many(extra, "new") + (kept[:3] if again else [])
    body = {"remove": {group: many(removed)}, "add": {group: added, "other": ["z"]}}
    tags, warnings = change_tags(current, body)
    if len(kept) + extra > MAX_TAGS:
        assert warnings == [
            {"path": f"add.{group}", "detail": f"add.{group} would take the group past 100 tags"}
        ]
        assert tags.get(group, []) == kept
    else:
        assert warnings == []
        assert tags.get(group, []) == kept + many(extra, "new")
    assert tags["other"] == ["z"]
    check_tags(tags)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["g", "herald_x", ""]) | st.text(max_size=4), children)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(
    current=currents,
    body=st.dictionaries(
        st.sampled_from(["add", "remove", "set"]) | st.text(max_size=4), _json, max_size=3
    ),
)
def test_any_request_applies_or_raises_bad_request(
    current: dict[str, list[str]], body: dict[str, Any]
) -> None:
    before = copy.deepcopy((current, body))
    try:
        tags, warnings = change_tags(current, body)
    except BadRequest:
        tags, warnings = {}, []
    assert (current, body) == before
    check_tags(tags)
    for warning in warnings:
        assert warning["path"].split(".", 1)[0] in body


@settings(max_examples=60, deadline=None)
@given(value=_json)
def test_any_registration_parses_or_raises_bad_request(value: object) -> None:
    path: str | None = "tags"
    try:
        tags = parse_tags(value)
    except BadRequest as error:
        path = error.path
    else:
        check_tags(tags)
        assert not any(group.startswith(RESERVED_PREFIX) for group in tags)
        assert parse_tags(tags) == tags
    assert path is not None
    assert path.startswith("tags")
