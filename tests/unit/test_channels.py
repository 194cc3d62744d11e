"""Channel bodies into `Channel` values: every rejected field names its path."""

from __future__ import annotations

from typing import Any

import pytest

from herald.channels import parse_annotations, parse_channel, parse_metadata, payload_size
from herald.config import Settings
from herald.errors import BadRequest
from herald.models import ACL

SETTINGS = Settings()


def rejected(body: object, settings: Settings = SETTINGS) -> BadRequest:
    """The error `parse_channel` raises for ``body`` (failing the test if it accepts it)."""
    with pytest.raises(BadRequest) as error:
        parse_channel(body, "app", settings)
    return error.value


def test_minimal_body_gets_defaults() -> None:
    channel = parse_channel({"name": "news"}, "app1", SETTINGS)
    assert channel.app == "app1"
    assert channel.name == "news"
    assert channel.type == "default"
    assert channel.description == ""
    assert channel.custom_publish is False
    assert channel.readers == ACL(public=True)
    assert channel.writers == ACL()
    assert channel.editors == ACL()
    assert channel.annotations == []
    assert channel.history_size == 100
    assert channel.history_ttl is None
    assert channel.idle_timeout is None
    assert channel.messages == 0


def test_every_field_is_taken() -> None:
    channel = parse_channel(
        {
            "name": "chat",
            "description": "rooms for chat",
            "type": "separate_rooms",
            "custom_publish": True,
            "readers": {"public": False, "any_user": True},
            "writers": {"user_ids": ["u1"]},
            "editors": {"user_ids": ["u2"], "immutable": True},
            "annotations": [{"type": "color", "value": "red"}],
            "history_size": 100_000,
            "history_ttl": 3600,
            "idle_timeout": 60,
        },
        "app1",
        SETTINGS,
    )
    assert channel.description == "rooms for chat"
    assert channel.type == "separate_rooms"
    assert channel.custom_publish is True
    assert channel.readers == ACL(any_user=True)
    assert channel.writers == ACL(user_ids=["u1"])
    assert channel.editors == ACL(user_ids=["u2"], immutable=True)
    assert channel.annotations == [{"type": "color", "value": "red"}]
    assert channel.history_size == 100_000
    assert channel.history_ttl == 3600
    assert channel.idle_timeout == 60


@pytest.mark.parametrize("body", [[], "news", None, 5])
def test_body_must_be_an_object(body: object) -> None:
    error = rejected(body)
    assert error.detail == "the body must be a JSON object"
    assert error.path is None


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "a b"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": 5}, "name"),
        ({"name": "news", "type": "rooms"}, "type"),
        ({"name": "news", "type": None}, "type"),
        ({"name": "news", "description": 5}, "description"),
        ({"name": "news", "description": "x" * 1025}, "description"),
        ({"name": "news", "custom_publish": "true"}, "custom_publish"),
        ({"name": "news", "readers": []}, "readers"),
        ({"name": "news", "writers": {"public": 1}}, "writers.public"),
        ({"name": "news", "editors": {"admins": []}}, "editors.admins"),
        ({"name": "news", "history_size": 0}, "history_size"),
        ({"name": "news", "history_size": 100_001}, "history_size"),
        ({"name": "news", "history_size": -5}, "history_size"),
        ({"name": "news", "history_size": True}, "history_size"),
        ({"name": "news", "history_size": "10"}, "history_size"),
        ({"name": "news", "history_size": 10.0}, "history_size"),
        ({"name": "news", "history_ttl": 0}, "history_ttl"),
        ({"name": "news", "history_ttl": 10 * 365 * 86400 + 1}, "history_ttl"),
        ({"name": "news", "idle_timeout": -1}, "idle_timeout"),
        ({"name": "news", "annotations": {}}, "annotations"),
        ({"name": "news", "annotations": [{"type": "t"}]}, "annotations[0]"),
        ({"name": "news", "annotations": ["t"]}, "annotations[0]"),
        (
            {"name": "news", "annotations": [{"type": "t", "value": 1, "extra": 2}]},
            "annotations[0]",
        ),
        (
            {"name": "news", "annotations": [{"type": "t", "value": 1}, {"type": "", "value": 1}]},
            "annotations[1].type",
        ),
        ({"name": "news", "annotations": [{"type": "x" * 257, "value": 1}]}, "annotations[0].type"),
    ],
)
def test_invalid_field_names_its_path(body: dict[str, Any], path: str) -> None:
    assert rejected(body).path == path


def test_history_size_range_message() -> None:
    error = rejected({"name": "news", "history_size": 100_001})
    assert error.detail == "history_size must be an integer from 1 to 100000"


def test_history_size_bound_follows_settings() -> None:
    small = SETTINGS.replace(max_history_size=10)
    assert parse_channel({"name": "news", "history_size": 10}, "a", small).history_size == 10
    error = rejected({"name": "news", "history_size": 11}, small)
    assert error.path == "history_size"
    assert error.detail == "history_size must be an integer from 1 to 10"


def test_unknown_field_is_named() -> None:
    error = rejected({"name": "news", "zeta": 1, "beta": 2})
    assert error.path == "beta"
    assert error.detail == "unknown field 'beta'"


def test_unknown_field_reported_before_other_errors() -> None:
    assert rejected({"name": "bad name", "colour": "red"}).path == "colour"


def test_annotations_too_big() -> None:
    # The limit is on the JSON encoding of the whole list, not on one value.
    value = "x" * (SETTINGS.max_annotations_bytes // 2)
    error = rejected({"name": "news", "annotations": [{"type": "a", "value": value}] * 2})
    assert error.path == "annotations"
    assert error.detail == "annotations are larger than 8192 bytes"


def test_annotations_at_the_limit_are_accepted() -> None:
    overhead = len(b'[{"type":"a","value":""}]')
    value = "x" * (SETTINGS.max_annotations_bytes - overhead)
    annotations = [{"type": "a", "value": value}]
    assert parse_annotations(annotations, SETTINGS) == annotations
    with pytest.raises(BadRequest):
        parse_annotations([{"type": "a", "value": value + "x"}], SETTINGS)


def test_annotations_json_cannot_carry() -> None:
    error = rejected({"name": "news", "annotations": [{"type": "a", "value": b"raw"}]})
    assert error.path == "annotations"
    assert error.detail == "annotations holds a value JSON cannot represent"


def test_payload_size_is_compact_json_length() -> None:
    assert payload_size({"a": [1, "é"]}, "payload") == len('{"a":[1,"é"]}'.encode())
    with pytest.raises(BadRequest) as error:
        payload_size(2**70, "payload")
    assert error.value.path == "payload"


def test_parse_metadata() -> None:
    assert parse_metadata(None, SETTINGS) is None
    assert parse_metadata({"trace": "t1"}, SETTINGS) == {"trace": "t1"}
    for bad, detail in (
        (["trace"], "metadata must be an object"),
        ({"big": "x" * 4096}, "metadata is larger than 4096 bytes"),
    ):
        with pytest.raises(BadRequest) as error:
            parse_metadata(bad, SETTINGS)
        assert error.value.path == "metadata"
        assert error.value.detail == detail
