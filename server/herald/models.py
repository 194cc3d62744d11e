"""Plain values: topics, messages, channels, keys, and their validation.

No I/O here. Engines store these; the API and the protocol shape them.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from herald.errors import BadRequest

__all__ = [
    "ACL",
    "CHANNEL_TYPES",
    "App",
    "Channel",
    "Device",
    "KeyRecord",
    "Message",
    "Recovery",
    "StreamPosition",
    "Topic",
    "check_name",
    "now_rfc3339",
    "offset_key",
    "parse_offset",
]

CHANNEL_TYPES = ("default", "separate_rooms")
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
# [0-9], not \d: \d also matches non-ASCII digits, which no stream id contains.
_OFFSET = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def check_name(value: object, path: str) -> str:
    """Return ``value`` if it is a valid channel or room name, else raise `BadRequest`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BadRequest(
            f"{path} must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'",
            path=path,
        )
    return value


def parse_offset(value: object, path: str = "since") -> tuple[int, int]:
    """Parse a message id (``"<ms>-<seq>"``, as Redis streams write it) into a sortable pair."""
    if isinstance(value, str):
        match = _OFFSET.fullmatch(value)
        if match:
            return int(match[1]), int(match[2])
    raise BadRequest(f"{path} must be a message id like '1700000000000-0'", path=path)


def offset_key(message_id: str) -> tuple[int, int]:
    """Sort key of an id Herald made itself (trusted, so unchecked)."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)


_second: list[Any] = [-1, ""]  # [unix second, its "YYYY-MM-DDTHH:MM:SS" text]


def now_rfc3339() -> str:
    """The current time as RFC 3339 with microseconds, in UTC.

    On the publish path: the date part is formatted once per second, the rest
    is integer arithmetic.
    """
    micros = time.time_ns() // 1000
    second, fraction = divmod(micros, 1_000_000)
    if second != _second[0]:
        _second[0] = second
        _second[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{fraction:06d}Z"


class Topic(NamedTuple):
    """Where messages flow: one (app, channel, room). A default channel's room is ""."""

    app: str
    channel: str
    room: str = ""

    def key(self) -> str:
        """A string naming the topic, unique across apps (used as a broker channel name)."""
        return f"{self.app}\x1f{self.channel}\x1f{self.room}"


class StreamPosition(NamedTuple):
    """The newest message id of a topic ("0-0" before the first) and its history epoch."""

    offset: str
    epoch: str


@dataclass(slots=True)
class Message:
    """One published message, as stored in history and fanned out."""

    id: str
    app: str
    channel: str
    room: str
    payload: Any
    author: dict[str, str]
    created_at: str
    metadata: dict[str, Any] | None = None
    audience: dict[str, Any] | None = None

    @property
    def topic(self) -> Topic:
        """The topic the message was published to."""
        return Topic(self.app, self.channel, self.room)

    def fields(self) -> tuple[Any, ...]:
        """Every field but ``id``, in order: what engines store (``Message(id, *fields)``)."""
        return (
            self.app,
            self.channel,
            self.room,
            self.payload,
            self.author,
            self.created_at,
            self.metadata,
            self.audience,
        )

    def to_api(self) -> dict[str, Any]:
        """The message object of the HTTP API."""
        return {
            "id": self.id,
            "channel": self.channel,
            "room": self.room,
            "payload": self.payload,
            "author": self.author,
            "created_at": self.created_at,
            "action": "custom",
            "metadata": self.metadata,
            "links": {"self": f"/v1/channels/{self.channel}/messages/{self.id}"},
        }

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild the message (for engines that serialise)."""
        return {
            "id": self.id,
            "app": self.app,
            "channel": self.channel,
            "room": self.room,
            "payload": self.payload,
            "author": self.author,
            "created_at": self.created_at,
            "metadata": self.metadata,
            "audience": self.audience,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Message:
        """Inverse of `to_record`."""
        return cls(**record)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a subscribe with ``since`` gets: the missed messages and whether that is all."""

    messages: list[Message]
    recovered: bool
    position: StreamPosition


@dataclass(slots=True)
class ACL:
    """Who may do something on a channel."""

    public: bool = False
    any_user: bool = False
    user_ids: list[str] = field(default_factory=list)
    immutable: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ACL as the API shows it."""
        return {
            "public": self.public,
            "any_user": self.any_user,
            "user_ids": list(self.user_ids),
            "immutable": self.immutable,
        }

    @classmethod
    def parse(cls, value: object, path: str) -> ACL:
        """Validate an ACL object from a request body."""
        if not isinstance(value, dict):
            raise BadRequest(f"{path} must be an object", path=path)
        unknown = set(value) - {"public", "any_user", "user_ids", "immutable"}
        if unknown:
            name = sorted(unknown)[0]
            raise BadRequest(f"unknown field {name!r}", path=f"{path}.{name}")
        acl = cls()
        for flag in ("public", "any_user", "immutable"):
            if flag in value:
                if not isinstance(value[flag], bool):
                    raise BadRequest(f"{path}.{flag} must be a boolean", path=f"{path}.{flag}")
                setattr(acl, flag, value[flag])
        users = value.get("user_ids", [])
        if not isinstance(users, list) or not all(
            isinstance(u, str) and 0 < len(u) <= 128 for u in users
        ):
            raise BadRequest(
                f"{path}.user_ids must be a list of user ids (1-128 characters)",
                path=f"{path}.user_ids",
            )
        if len(users) > 1000:
            raise BadRequest(f"{path}.user_ids holds at most 1000 ids", path=f"{path}.user_ids")
        acl.user_ids = list(dict.fromkeys(users))
        return acl

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ACL:
        """Rebuild a stored ACL (trusted input)."""
        return cls(
            public=bool(value.get("public")),
            any_user=bool(value.get("any_user")),
            user_ids=list(value.get("user_ids", [])),
            immutable=bool(value.get("immutable")),
        )


@dataclass(slots=True)
class Channel:
    """A channel record. ``messages`` counts every publish since creation."""

    app: str
    name: str
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    description: str = ""
    type: str = "default"
    custom_publish: bool = False
    readers: ACL = field(default_factory=lambda: ACL(public=True))
    writers: ACL = field(default_factory=ACL)
    editors: ACL = field(default_factory=ACL)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    history_size: int = 100
    history_ttl: int | None = None
    idle_timeout: int | None = None
    owner: dict[str, str] | None = None
    is_inactive: bool = False
    created_at: str = field(default_factory=now_rfc3339)
    messages: int = 0

    def topic(self, room: str = "") -> Topic:
        """The topic of one room of this channel ("" for a default channel)."""
        return Topic(self.app, self.name, room)

    def check_room(self, room: object, path: str = "room") -> str:
        """Validate ``room`` against the channel type: required for separate_rooms, else absent."""
        if self.type == "separate_rooms":
            if room is None or room == "":
                raise BadRequest(
                    f"channel {self.name!r} has separate rooms: room is required", path=path
                )
            return check_name(room, path)
        if room is not None and room != "":
            raise BadRequest(f"channel {self.name!r} has no rooms: omit room", path=path)
        return ""

    def to_record(self) -> dict[str, Any]:
        """Everything stored about the channel."""
        return {
            "app": self.app,
            "name": self.name,
            "id": self.id,
            "description": self.description,
            "type": self.type,
            "custom_publish": self.custom_publish,
            "readers": self.readers.to_dict(),
            "writers": self.writers.to_dict(),
            "editors": self.editors.to_dict(),
            "annotations": self.annotations,
            "history_size": self.history_size,
            "history_ttl": self.history_ttl,
            "idle_timeout": self.idle_timeout,
            "owner": self.owner,
            "is_inactive": self.is_inactive,
            "created_at": self.created_at,
            "messages": self.messages,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Channel:
        """Inverse of `to_record`."""
        values = dict(record)
        for acl in ("readers", "writers", "editors"):
            values[acl] = ACL.from_dict(values[acl])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class App:
    """A tenant. ``token_secret`` signs its users' tokens (HS256); never shown."""

    name: str
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created_at: str = field(default_factory=now_rfc3339)

    def to_api(self) -> dict[str, str]:
        """The app as the API shows it."""
        return {"name": self.name, "created_at": self.created_at}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An app key as stored: never the key itself, only its hash."""

    id: str
    app: str
    scopes: tuple[str, ...]
    key_hash: str
    name: str = ""
    created_at: str = field(default_factory=now_rfc3339)

    def to_api(self) -> dict[str, object]:
        """The key as the API shows it: never the secret nor its hash."""
        return {
            "id": self.id,
            "scopes": list(self.scopes),
            "name": self.name,
            "created_at": self.created_at,
        }


@dataclass(slots=True)
class Device:
    """A registered device. Its ``connection_key`` is stored as a key record, never here.

    ``tags`` maps a tag group to its tags; groups named ``herald_*`` are set by
    Herald itself (from ``timezone`` and the locale fields).
    """

    id: str
    app: str
    address: str
    platform: str
    opt_in: bool = True
    tags: dict[str, list[str]] = field(default_factory=dict)
    timezone: str | None = None
    locale_country: str | None = None
    locale_language: str | None = None
    identifiers: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=now_rfc3339)
    updated_at: str = field(default_factory=now_rfc3339)

    def to_api(self) -> dict[str, Any]:
        """The device as the API shows it (there is no key in it to hide)."""
        record = self.to_record()
        del record["app"]
        record["device_id"] = record.pop("id")
        return record

    def to_record(self) -> dict[str, Any]:
        """Everything stored about the device."""
        return {
            "id": self.id,
            "app": self.app,
            "address": self.address,
            "platform": self.platform,
            "opt_in": self.opt_in,
            "tags": {group: list(tags) for group, tags in self.tags.items()},
            "timezone": self.timezone,
            "locale_country": self.locale_country,
            "locale_language": self.locale_language,
            "identifiers": dict(self.identifiers),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Device:
        """Inverse of `to_record`."""
        return cls(**record)
