"""Plain values and their validation: names, offsets, rooms, ACLs, settings."""

from __future__ import annotations

import re
from typing import Any

import pytest

from herald.config import ConfigError, Settings
from herald.errors import BadRequest
from herald.models import (
    ACL,
    Channel,
    Message,
    Topic,
    check_name,
    now_rfc3339,
    offset_key,
    parse_offset,
)

NAME_RULE = "must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'"

# check_name


@pytest.mark.parametrize("name", ["a", "Z", "news", "a-b_c.d:e", "0", "x" * 128, "A.9:-_"])
def test_check_name_accepts_valid(name: str) -> None:
    assert check_name(name, "channel") == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 129, "a b", "a/b", "é", "news\n", "*", "a,b", None, 5, ["news"]],
)
def test_check_name_rejects_invalid(name: object) -> None:
    with pytest.raises(BadRequest) as error:
        check_name(name, "room")
    assert error.value.path == "room"
    assert error.value.detail == f"room {NAME_RULE}"
    assert error.value.status == 400


# parse_offset / offset_key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-0", (0, 0)),
        ("1700000000000-0", (1700000000000, 0)),
        ("1700000000000-15", (1700000000000, 15)),
        ("00012-003", (12, 3)),
        ("9" * 20 + "-" + "9" * 20, (10**20 - 1, 10**20 - 1)),
    ],
)
def test_parse_offset_accepts_stream_ids(text: str, expected: tuple[int, int]) -> None:
    assert parse_offset(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0",
        "1-",
        "-1",
        "1--1",
        "1-2-3",
        " 1-2",
        "1-2\n",
        "a-b",
        "1.5-0",
        "1" * 21 + "-0",
        "\u0661-\u0660",  # Arabic-Indic digits: Redis would reject them
        5,
        None,
        (1, 0),
    ],
)
def test_parse_offset_rejects_everything_else(value: object) -> None:
    with pytest.raises(BadRequest) as error:
        parse_offset(value)
    assert error.value.path == "since"
    assert error.value.detail == "since must be a message id like '1700000000000-0'"


def test_parse_offset_names_the_given_path() -> None:
    with pytest.raises(BadRequest) as error:
        parse_offset("nope", "until")
    assert error.value.path == "until"
    assert error.value.detail.startswith("until must be")


def test_offset_key_sorts_numerically() -> None:
    ids = ["2-0", "10-0", "10-10", "10-9", "1-99"]
    assert sorted(ids, key=offset_key) == ["1-99", "2-0", "10-0", "10-9", "10-10"]
    assert offset_key("1700000000000-7") == (1700000000000, 7)


def test_now_rfc3339_has_microseconds_and_z() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", now_rfc3339())


# Topic / Message


def test_topic_key_is_unique_per_app_channel_room() -> None:
    assert Topic("a", "news").room == ""
    keys = {Topic("a", "b", "c").key(), Topic("a", "b", "").key(), Topic("a", "bc").key()}
    assert len(keys) == 3
    assert Topic("app", "news", "r1").key() == "app\x1fnews\x1fr1"


def test_message_record_round_trip() -> None:
    message = Message(
        id="1-2",
        app="a",
        channel="news",
        room="r",
        payload={"x": [1]},
        author={"type": "user", "id": "u1"},
        created_at="2024-01-01T00:00:00.000000Z",
        metadata={"m": 1},
        audience={"tag": "toaster", "group": "device"},
    )
    assert Message.from_record(message.to_record()) == message
    assert message.topic == Topic("a", "news", "r")
    assert message.to_api() == {
        "id": "1-2",
        "channel": "news",
        "room": "r",
        "payload": {"x": [1]},
        "author": {"type": "user", "id": "u1"},
        "created_at": "2024-01-01T00:00:00.000000Z",
        "action": "custom",
        "metadata": {"m": 1},
        "links": {"self": "/v1/channels/news/messages/1-2"},
    }


# Channel.check_room


def test_default_channel_takes_no_room() -> None:
    channel = Channel(app="a", name="news")
    assert channel.check_room(None) == ""
    assert channel.check_room("") == ""
    with pytest.raises(BadRequest) as error:
        channel.check_room("lobby")
    assert error.value.path == "room"
    assert error.value.detail == "channel 'news' has no rooms: omit room"


def test_default_channel_room_error_uses_given_path() -> None:
    with pytest.raises(BadRequest) as error:
        Channel(app="a", name="news").check_room("lobby", "items[2].room")
    assert error.value.path == "items[2].room"


def test_separate_rooms_channel_requires_a_room() -> None:
    channel = Channel(app="a", name="chat", type="separate_rooms")
    assert channel.check_room("lobby") == "lobby"
    for missing in (None, ""):
        with pytest.raises(BadRequest) as error:
            channel.check_room(missing)
        assert error.value.path == "room"
        assert error.value.detail == "channel 'chat' has separate rooms: room is required"


@pytest.mark.parametrize("room", ["a b", "x" * 129, 5])
def test_separate_rooms_channel_checks_room_name(room: object) -> None:
    with pytest.raises(BadRequest) as error:
        Channel(app="a", name="chat", type="separate_rooms").check_room(room)
    assert error.value.path == "room"
    assert error.value.detail == f"room {NAME_RULE}"


def test_channel_topic_and_record_round_trip() -> None:
    channel = Channel(
        app="a",
        name="chat",
        type="separate_rooms",
        readers=ACL(any_user=True),
        writers=ACL(user_ids=["u1"], immutable=True),
        history_size=5,
        history_ttl=60,
        messages=3,
    )
    assert channel.topic("lobby") == Topic("a", "chat", "lobby")
    assert Channel.from_record(channel.to_record()) == channel


def test_channel_defaults() -> None:
    channel = Channel(app="a", name="news")
    assert channel.type == "default"
    assert channel.history_size == 100
    assert channel.readers == ACL(public=True)
    assert channel.writers == ACL()
    assert len(channel.id) == 16
    assert channel.id != Channel(app="a", name="news").id


# ACL.parse


def test_acl_parse_valid() -> None:
    acl = ACL.parse(
        {"public": False, "any_user": True, "user_ids": ["b", "a", "b"], "immutable": True},
        "writers",
    )
    # Duplicates dropped, first occurrence's order kept.
    assert acl == ACL(public=False, any_user=True, user_ids=["b", "a"], immutable=True)
    assert ACL.parse({}, "readers") == ACL()


@pytest.mark.parametrize(
    ("value", "path", "detail"),
    [
        ([], "readers", "readers must be an object"),
        (None, "readers", "readers must be an object"),
        ({"public": True, "zeta": 1, "alpha": 2}, "readers.alpha", "unknown field 'alpha'"),
        ({"public": "yes"}, "readers.public", "readers.public must be a boolean"),
        ({"any_user": 1}, "readers.any_user", "readers.any_user must be a boolean"),
        ({"immutable": None}, "readers.immutable", "readers.immutable must be a boolean"),
        (
            {"user_ids": "u1"},
            "readers.user_ids",
            "readers.user_ids must be a list of user ids (1-128 characters)",
        ),
        (
            {"user_ids": ["u1", ""]},
            "readers.user_ids",
            "readers.user_ids must be a list of user ids (1-128 characters)",
        ),
        (
            {"user_ids": ["x" * 129]},
            "readers.user_ids",
            "readers.user_ids must be a list of user ids (1-128 characters)",
        ),
        (
            {"user_ids": [5]},
            "readers.user_ids",
            "readers.user_ids must be a list of user ids (1-128 characters)",
        ),
        (
            {"user_ids": [f"u{i}" for i in range(1001)]},
            "readers.user_ids",
            "readers.user_ids holds at most 1000 ids",
        ),
    ],
)
def test_acl_parse_errors_carry_path(value: object, path: str, detail: str) -> None:
    with pytest.raises(BadRequest) as error:
        ACL.parse(value, "readers")
    assert error.value.path == path
    assert error.value.detail == detail


def test_acl_accepts_exactly_1000_users() -> None:
    users = [f"u{i}" for i in range(1000)]
    assert ACL.parse({"user_ids": users}, "readers").user_ids == users


def test_acl_dict_round_trip() -> None:
    acl = ACL(public=True, any_user=False, user_ids=["u1"], immutable=True)
    assert acl.to_dict() == {
        "public": True,
        "any_user": False,
        "user_ids": ["u1"],
        "immutable": True,
    }
    assert ACL.from_dict(acl.to_dict()) == acl


# Settings.from_env


def test_settings_defaults_from_empty_env() -> None:
    assert Settings.from_env({}) == Settings()


def test_settings_coerce_env_values() -> None:
    settings = Settings.from_env(
        {
            "HERALD_HOST": "0.0.0.0",
            "HERALD_PORT": "9000",
            "HERALD_CONNECT_TIMEOUT": "2.5",
            "HERALD_WEBSOCKET_COMPRESSION": "yes",
            "HERALD_MAX_BAD_FRAMES": "5",
            "HERALD_REDIS_URL": "redis://localhost:6379/0",
            "HERALD_LOG_LEVEL": "",  # empty means unset, not ""
            "HERALD_UNKNOWN": "ignored",
            "PORT": "1",
        }
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.connect_timeout == 2.5
    assert settings.websocket_compression is True
    assert settings.max_bad_frames == 5
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.log_level == "info"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), (" on ", True), ("0", False), ("no", False), ("off", False)],
)
def test_settings_bool_from_env(raw: str, expected: bool) -> None:
    settings = Settings.from_env({"HERALD_WEBSOCKET_COMPRESSION": raw})
    assert settings.websocket_compression is expected


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("HERALD_PORT", "eighty", "HERALD_PORT='eighty' is not a valid int"),
        ("HERALD_CONNECT_TIMEOUT", "soon", "HERALD_CONNECT_TIMEOUT='soon' is not a valid float"),
    ],
)
def test_settings_bad_env_value_is_config_error(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({name: raw})
    assert str(error.value) == message


def test_settings_overrides_win_and_none_falls_through() -> None:
    env = {"HERALD_PORT": "9000", "HERALD_HOST": "0.0.0.0"}
    settings = Settings.from_env(env, port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("env", "overrides"),
    [({}, {"workers": 2}), ({"HERALD_WORKERS": "2"}, {})],
    ids=["flag", "env"],
)
def test_settings_several_workers_need_redis(
    env: dict[str, str], overrides: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env(env, **overrides)
    message = str(error.value)
    assert message.startswith("--workers > 1 needs the Redis engine")
    assert "Pass --redis URL (or HERALD_REDIS_URL), or run one worker." in message


def test_settings_several_workers_with_redis() -> None:
    settings = Settings.from_env({"HERALD_REDIS_URL": "redis://r:6379"}, workers=4)
    assert settings.workers == 4
    assert settings.engine == "redis"


def test_settings_redis_cluster_picks_the_cluster_engine() -> None:
    env = {"HERALD_REDIS_CLUSTER": "redis://a:7000,redis://b:7001"}
    settings = Settings.from_env(env, workers=4)
    assert settings.engine == "redis-cluster"
    assert Settings.from_env({}).engine == "memory"
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({**env, "HERALD_REDIS_URL": "redis://r:6379"})


def test_cluster_urls_parse_into_startup_nodes_and_credentials() -> None:
    from herald.engines.redis_cluster import parse_cluster_urls

    nodes, credentials = parse_cluster_urls("redis://:s%40cret@h1:7000, h2:7001,,rediss://h3")
    assert [(n.host, int(n.port)) for n in nodes] == [("h1", 7000), ("h2", 7001), ("h3", 6379)]
    assert credentials == {"username": None, "password": "s@cret"}
    for bad in ("", " , ", "http://h:1", "redis://:7000"):
        with pytest.raises(ValueError, match=r"Redis Cluster node|not a Redis URL"):
            parse_cluster_urls(bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "--workers must be at least 1"),
        ({"log_format": "xml"}, "--log-format must be 'text' or 'json'"),
        ({"max_frame_bytes": 0}, "max_frame_bytes must be positive"),
        ({"outbox_limit_bytes": -1}, "outbox_limit_bytes must be positive"),
    ],
)
def test_settings_refuses_unusable_values(overrides: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({}, **overrides)
    assert str(error.value) == message


def test_settings_replace_returns_changed_copy() -> None:
    settings = Settings()
    changed = settings.replace(port=1234)
    assert (settings.port, changed.port) == (8000, 1234)


def test_settings_to_env_round_trips() -> None:
    settings = Settings(
        port=9001,
        workers=2,
        redis_url="redis://r:6379/1",
        connect_timeout=2.5,
        websocket_compression=True,
        log_format="json",
    )
    env = settings.to_env()
    assert env["HERALD_WEBSOCKET_COMPRESSION"] == "1"
    assert "HERALD_ADMIN_KEY" not in env
    assert Settings.from_env(env) == settings
