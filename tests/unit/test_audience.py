"""Audiences: validation with paths, normalisation, matching devices, and who sees what."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herald.audience import (
    MAX_DEPTH,
    MAX_OPERANDS,
    MAX_SELECTORS,
    matches,
    parse_audience,
    visible,
)
from herald.errors import BadRequest
from herald.models import Device

NAME_RULE = "must be 1-128 characters without control characters"
FORMS = "'tag', 'and', 'or', 'not', 'device_id'"


def device(
    tags: dict[str, list[str]] | None = None, *, id: str = "dev_1", opt_in: bool = True
) -> Device:
    """A device with these tags; the other fields do not take part in matching."""
    return Device(id=id, app="app", address="addr", platform="web", opt_in=opt_in, tags=tags or {})


def tag(name: str, group: str = "device") -> dict[str, Any]:
    """A normalised tag selector."""
    return {"tag": name, "group": group}


def nested_not(levels: int) -> dict[str, Any]:
    """A tag wrapped in ``levels`` nots: ``levels + 1`` levels deep."""
    audience: dict[str, Any] = {"tag": "t"}
    for _ in range(levels):
        audience = {"not": audience}
    return audience


def bad_request(value: object, path: str = "audience") -> BadRequest:
    """The error parsing ``value`` raises (failing the test when there is none)."""
    with pytest.raises(BadRequest) as error:
        parse_audience(value, path)
    assert error.value.status == 400
    return error.value


# parse_audience: the valid forms


def test_tag_without_group_is_in_the_device_group() -> None:
    assert parse_audience({"tag": "toaster"}) == tag("toaster", "device")


def test_tag_keeps_its_group() -> None:
    assert parse_audience({"tag": "Europe/Paris", "group": "herald_timezone"}) == tag(
        "Europe/Paris", "herald_timezone"
    )


def test_compound_forms_are_normalised_all_the_way_down() -> None:
    raw = {
        "and": [
            {"tag": "a"},
            {"or": [{"tag": "b", "group": "g"}, {"not": {"tag": "c"}}]},
            {"device_id": "dev_9"},
        ]
    }
    assert parse_audience(raw) == {
        "and": [
            tag("a"),
            {"or": [tag("b", "g"), {"not": tag("c")}]},
            {"device_id": "dev_9"},
        ]
    }


def test_parse_returns_new_objects_and_leaves_input_alone() -> None:
    raw: dict[str, Any] = {"or": [{"tag": "a"}]}
    before = copy.deepcopy(raw)
    parsed = parse_audience(raw)
    parsed["or"].append(tag("x"))
    assert raw == before


@pytest.mark.parametrize("name", ["a", "x" * 128, "é", "with space", "a/b", "🙂"])
def test_tag_names_are_any_short_text(name: str) -> None:
    assert parse_audience({"tag": name, "group": name}) == tag(name, name)


def test_operand_counts_at_the_limits() -> None:
    assert parse_audience({"or": [{"tag": "a"}]}) == {"or": [tag("a")]}
    many = parse_audience({"and": [{"tag": str(i)} for i in range(MAX_OPERANDS)]})
    assert len(many["and"]) == MAX_OPERANDS


def test_device_id_lengths_at_the_limits() -> None:
    assert parse_audience({"device_id": "d"}) == {"device_id": "d"}
    assert parse_audience({"device_id": "d" * 128}) == {"device_id": "d" * 128}


# parse_audience: errors and their paths


@pytest.mark.parametrize("value", [None, "tag", 5, True, ["tag"], [{"tag": "a"}]])
def test_audience_must_be_an_object(value: object) -> None:
    error = bad_request(value)
    assert error.path == "audience"
    assert error.detail == "audience must be an object"


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"group": "device"},
        {"tag": "a", "device_id": "d"},
        {"and": [{"tag": "a"}], "or": [{"tag": "b"}]},
        {"not": {"tag": "a"}, "tag": "b"},
    ],
)
def test_exactly_one_form(value: dict[str, Any]) -> None:
    error = bad_request(value)
    assert error.path == "audience"
    assert error.detail == f"audience must have exactly one of {FORMS}"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"tag": "a", "extra": 1}, "audience.extra"),
        ({"tag": "a", "group": "g", "zz": 1, "yy": 2}, "audience.yy"),
        ({"device_id": "d", "group": "device"}, "audience.group"),
        ({"not": {"tag": "a"}, "group": "device"}, "audience.group"),
        ({"and": [{"tag": "a"}], "audience": 1}, "audience.audience"),
    ],
)
def test_unknown_fields(value: dict[str, Any], path: str) -> None:
    error = bad_request(value)
    assert error.path == path
    assert error.detail == f"unknown field {path.rsplit('.', 1)[1]!r}"


@pytest.mark.parametrize("name", ["", "x" * 129, None, 5, ["a"], "a\nb", "\x00", "a\x7f", "\x85"])
@pytest.mark.parametrize("field", ["tag", "group"])
def test_tag_and_group_names(field: str, name: object) -> None:
    value: dict[str, Any] = {"tag": "a", "group": "g", field: name}
    error = bad_request(value)
    assert error.path == f"audience.{field}"
    assert error.detail == f"audience.{field} {NAME_RULE}"


@pytest.mark.parametrize("form", ["and", "or"])
@pytest.mark.parametrize(
    "operands",
    [[], [{"tag": "a"}] * (MAX_OPERANDS + 1), {"tag": "a"}, None, "ab", ({"tag": "a"},)],
)
def test_and_or_take_1_to_100_audiences(form: str, operands: object) -> None:
    error = bad_request({form: operands})
    assert error.path == f"audience.{form}"
    assert error.detail == f"audience.{form} must be a list of 1-100 audiences"


@pytest.mark.parametrize("device_id", ["", "d" * 129, None, 7, ["d"]])
def test_device_id_is_1_to_128_characters(device_id: object) -> None:
    error = bad_request({"device_id": device_id})
    assert error.path == "audience.device_id"
    assert error.detail == "audience.device_id must be a device id of 1-128 characters"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"and": [{"tag": "a"}, {"tag": ""}]}, "audience.and[1].tag"),
        ({"or": [{"not": {"device_id": 3}}]}, "audience.or[0].not.device_id"),
        ({"not": {"and": [{"tag": "a"}, 5]}}, "audience.not.and[1]"),
        ({"and": [{"or": [{"tag": "a"}, {"tag": "b", "x": 1}]}]}, "audience.and[0].or[1].x"),
        ({"not": {"or": []}}, "audience.not.or"),
        ({"not": {}}, "audience.not"),
        ({"and": [{"tag": "a"}, {"tag": "b", "group": "\t"}]}, "audience.and[1].group"),
    ],
)
def test_nested_errors_carry_their_path(value: object, path: str) -> None:
    assert bad_request(value).path == path


def test_the_first_fault_is_the_one_reported() -> None:
    assert bad_request({"or": [{"tag": "a"}, {"tag": 1}, {"device_id": 1}]}).path == (
        "audience.or[1].tag"
    )


def test_path_prefix_is_the_callers() -> None:
    error = bad_request({"and": [{"tag": "a"}, {"tag": ""}]}, path="messages[2].audience")
    assert error.path == "messages[2].audience.and[1].tag"
    assert error.detail == f"messages[2].audience.and[1].tag {NAME_RULE}"


def test_depth_limit() -> None:
    assert MAX_DEPTH == 8
    parse_audience(nested_not(MAX_DEPTH - 1))  # eight levels: allowed
    error = bad_request(nested_not(MAX_DEPTH))
    assert error.path == "audience" + ".not" * MAX_DEPTH
    assert error.detail == f"{error.path} is nested too deeply: an audience has at most 8 levels"


def test_depth_counts_and_or_levels_too() -> None:
    audience: dict[str, Any] = {"tag": "t"}
    for level in range(MAX_DEPTH - 1):
        audience = {"and" if level % 2 else "or": [{"tag": "x"}, audience]}
    parse_audience(audience)
    assert str(bad_request({"and": [audience]}).path).startswith("audience.and[0].or[1]")


def test_very_deep_input_is_refused_without_recursing_through_it() -> None:
    error = bad_request(nested_not(100_000))
    assert error.path == "audience" + ".not" * MAX_DEPTH


def test_selector_limit() -> None:
    assert MAX_SELECTORS == 200
    # The and, its two ors and 99 + 98 tags: 200 selectors; one tag more is too many.
    fits = {"and": [{"or": [{"tag": "a"}] * 99}, {"or": [{"tag": "b"}] * 98}]}
    assert len(parse_audience(fits)["and"][1]["or"]) == 98
    over = {"and": [{"or": [{"tag": "a"}] * 99}, {"or": [{"tag": "b"}] * 99}]}
    error = bad_request(over)
    assert error.path == "audience"
    assert error.detail == "audience holds at most 200 selectors"


def test_huge_input_is_refused_at_the_selector_limit() -> None:
    # 100**4 selectors if walked in full: the count stops the walk early.
    wide: dict[str, Any] = {"tag": "t"}
    for _ in range(4):
        wide = {"or": [wide] * MAX_OPERANDS}
    assert bad_request(wide).detail == "audience holds at most 200 selectors"


# matches


def test_tag_matches_in_its_group_only() -> None:
    toaster = device({"device": ["toaster", "kitchen"], "room": ["hall"]})
    assert matches(tag("toaster"), toaster)
    assert not matches(tag("toaster", "room"), toaster)
    assert matches(tag("hall", "room"), toaster)
    assert not matches(tag("hall"), toaster)
    assert not matches(tag("hall", "missing"), toaster)


def test_device_id_matches_that_device_only() -> None:
    assert matches({"device_id": "dev_1"}, device(id="dev_1"))
    assert not matches({"device_id": "dev_1"}, device(id="dev_2"))


def test_and_or_not() -> None:
    d = device({"device": ["a", "b"]})
    assert matches({"and": [tag("a"), tag("b")]}, d)
    assert not matches({"and": [tag("a"), tag("c")]}, d)
    assert matches({"or": [tag("c"), tag("b")]}, d)
    assert not matches({"or": [tag("c"), tag("d")]}, d)
    assert matches({"not": tag("c")}, d)
    assert not matches({"not": tag("a")}, d)
    assert matches({"not": {"not": tag("a")}}, d)


def test_matches_a_parsed_audience() -> None:
    audience = parse_audience(
        {
            "and": [
                {"tag": "Europe/Paris", "group": "herald_timezone"},
                {"not": {"or": [{"tag": "muted"}, {"device_id": "dev_2"}]}},
            ]
        }
    )
    paris = {"herald_timezone": ["Europe/Paris"]}
    assert matches(audience, device(paris, id="dev_1"))
    assert not matches(audience, device(paris, id="dev_2"))
    assert not matches(audience, device({**paris, "device": ["muted"]}, id="dev_1"))
    assert not matches(audience, device({"herald_timezone": ["UTC"]}, id="dev_1"))


# visible


def test_non_device_subscribers_see_only_messages_without_audience() -> None:
    assert visible(None, None)
    assert not visible(tag("a"), None)
    assert not visible({"not": tag("a")}, None)


def test_opted_in_devices_see_unaddressed_and_matching_messages() -> None:
    d = device({"device": ["a"]})
    assert visible(None, d)
    assert visible(tag("a"), d)
    assert not visible(tag("b"), d)


def test_opted_out_devices_see_nothing() -> None:
    d = device({"device": ["a"]}, opt_in=False)
    assert not visible(None, d)
    assert not visible(tag("a"), d)
    assert not visible({"not": tag("b")}, d)


# Properties. Small pools of names, so that random audiences and devices meet often.

GROUPS = ["device", "g", "herald_timezone"]
TAGS = ["a", "b", "c", "d"]
DEVICE_IDS = ["dev_1", "dev_2", "dev_3"]


def _selectors(audience: dict[str, Any]) -> tuple[int, int]:
    """Depth and selector count of a raw audience."""
    children: list[dict[str, Any]] = []
    if "not" in audience:
        children = [audience["not"]]
    for form in ("and", "or"):
        children += audience.get(form, [])
    sizes = [_selectors(child) for child in children]
    return 1 + max((d for d, _ in sizes), default=0), 1 + sum(n for _, n in sizes)


_leaves = st.one_of(
    st.builds(lambda t: {"tag": t}, st.sampled_from(TAGS)),
    st.builds(lambda t, g: {"tag": t, "group": g}, st.sampled_from(TAGS), st.sampled_from(GROUPS)),
    st.builds(lambda i: {"device_id": i}, st.sampled_from(DEVICE_IDS)),
)


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    operands = st.lists(children, min_size=1, max_size=4)
    return st.one_of(
        st.builds(lambda c: {"and": c}, operands),
        st.builds(lambda c: {"or": c}, operands),
        st.builds(lambda c: {"not": c}, children),
    )


def _within_limits(audience: dict[str, Any]) -> bool:
    depth, count = _selectors(audience)
    # Room to spare under the selector limit, for the spoilers below.
    return depth <= MAX_DEPTH and count <= MAX_SELECTORS // 2


raw_audiences = st.recursive(_leaves, _extend, max_leaves=10).filter(_within_limits)

devices = st.builds(
    lambda id, opt_in, tags: device(tags, id=id, opt_in=opt_in),
    st.sampled_from(DEVICE_IDS),
    st.booleans(),
    st.dictionaries(
        st.sampled_from(GROUPS), st.lists(st.sampled_from(TAGS), min_size=1, unique=True)
    ),
)


def reference(audience: dict[str, Any], universe: list[Device]) -> set[int]:
    """The positions in ``universe`` of the devices in a raw audience, by set algebra."""
    everyone = set(range(len(universe)))
    if "tag" in audience:
        group = audience.get("group", "device")
        return {i for i, d in enumerate(universe) if audience["tag"] in d.tags.get(group, [])}
    if "device_id" in audience:
        return {i for i, d in enumerate(universe) if d.id == audience["device_id"]}
    if "not" in audience:
        return everyone - reference(audience["not"], universe)
    parts = [reference(operand, universe) for operand in audience.get("and", [])]
    if parts:
        return set.intersection(*parts)
    return set().union(*(reference(operand, universe) for operand in audience["or"]))


@settings(max_examples=60, deadline=None)
@given(raw=raw_audiences, universe=st.lists(devices, min_size=1, max_size=6))
def test_matches_agrees_with_set_algebra(raw: dict[str, Any], universe: list[Device]) -> None:
    audience = parse_audience(raw)
    found = {i for i, d in enumerate(universe) if matches(audience, d)}
    assert found == reference(raw, universe)


@settings(max_examples=60, deadline=None)
@given(a=raw_audiences, b=raw_audiences, d=devices)
def test_de_morgan(a: dict[str, Any], b: dict[str, Any], d: Device) -> None:
    x, y = parse_audience(a), parse_audience(b)
    assert matches({"not": {"and": [x, y]}}, d) == matches({"or": [{"not": x}, {"not": y}]}, d)
    assert matches({"not": {"or": [x, y]}}, d) == matches({"and": [{"not": x}, {"not": y}]}, d)
    assert matches({"not": {"not": x}}, d) == matches(x, d)
    assert matches({"or": [x, {"not": x}]}, d)
    assert not matches({"and": [x, {"not": x}]}, d)


@settings(max_examples=50, deadline=None)
@given(raw=raw_audiences, d=devices)
def test_visible_follows_matches_and_opt_in(raw: dict[str, Any], d: Device) -> None:
    audience = parse_audience(raw)
    assert visible(audience, d) == (d.opt_in and matches(audience, d))
    assert visible(None, d) == d.opt_in
    assert not visible(audience, None)


@settings(max_examples=50, deadline=None)
@given(raw=raw_audiences)
def test_parse_is_idempotent_and_pure(raw: dict[str, Any]) -> None:
    before = copy.deepcopy(raw)
    parsed = parse_audience(raw)
    assert raw == before
    assert parse_audience(parsed) == parsed
    assert _selectors(parsed) == _selectors(raw)


def _nodes(audience: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every selector of a raw audience with its path, the top one first."""
    found = [(path, audience)]
    if "not" in audience:
        found += _nodes(audience["not"], f"{path}.not")
    for form in ("and", "or"):
        for i, operand in enumerate(audience.get(form, [])):
            found += _nodes(operand, f"{path}.{form}[{i}]")
    return found


# Ways to spoil one selector, each with the path (below the selector's) its error names.
_SPOILERS: list[tuple[Any, str]] = [
    (lambda s: 5, ""),
    (lambda s: [s], ""),
    (lambda s: None, ""),
    (lambda s: {}, ""),
    (lambda s: {**s, "extra": 1}, ".extra"),
    (lambda s: {**s, "device_id": "d"} if "device_id" not in s else {**s, "tag": "t"}, ""),
    (lambda s: {"tag": "x" * 129}, ".tag"),
    (lambda s: {"tag": "t", "group": ""}, ".group"),
    (lambda s: {"and": []}, ".and"),
    (lambda s: {"or": s}, ".or"),
    (lambda s: {"not": 1}, ".not"),
    (lambda s: {"device_id": ""}, ".device_id"),
]


@settings(max_examples=100, deadline=None)
@given(raw=raw_audiences, data=st.data())
def test_one_spoilt_selector_is_reported_at_its_path(
    raw: dict[str, Any], data: st.DataObject
) -> None:
    path, node = data.draw(st.sampled_from(_nodes(raw, "audience")))
    spoil, below = data.draw(st.sampled_from(_SPOILERS))
    spoilt = spoil(dict(node))
    # Swap the node for its spoilt copy in a copy of the tree.
    tree = copy.deepcopy(raw)
    if path == "audience":
        tree = spoilt
    else:
        parent: Any = tree
        steps = path[len("audience.") :].replace("[", ".").replace("]", "").split(".")
        for step in steps[:-1]:
            parent = parent[int(step)] if step.isdigit() else parent[step]
        last = steps[-1]
        parent[int(last) if last.isdigit() else last] = spoilt
    with pytest.raises(BadRequest) as error:
        parse_audience(tree)
    assert error.value.path == path + below


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["tag", "group", "and", "or", "not", "device_id", "x"]) | st.text(),
            children,
            max_size=3,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(value=_json)
def test_any_json_parses_or_raises_bad_request_at_a_path(value: object) -> None:
    path: str | None = "audience"
    try:
        parsed = parse_audience(value)
    except BadRequest as error:
        path = error.path
    else:
        assert parse_audience(parsed) == parsed
    assert path is not None
    assert path.startswith("audience")
