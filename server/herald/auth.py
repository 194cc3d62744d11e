"""Credentials to principals, and the permission checks made on them. No I/O.

Keys are random (192 bits), shown once, stored as SHA-256 hashes: a slow
hash buys nothing for secrets that long, and lookups stay one hash away.
User tokens are JWTs (HS256) signed with the app's token secret; PyJWT
checks the signature, ``exp`` and the algorithm.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import jwt

from herald.errors import Forbidden, Unauthorized
from herald.models import ACL, App, Channel, KeyRecord

__all__ = [
    "CHANNEL_KEYS",
    "DEVICE_SCOPE",
    "SCOPES",
    "Principal",
    "can_edit",
    "can_publish",
    "can_read",
    "hash_key",
    "looks_like_token",
    "mint_token",
    "new_key",
    "principal_for_key",
    "principal_for_token",
    "require_scope",
    "token_issuer",
]

SCOPES = ("admin", "publish", "subscribe")
"""App key scopes. ``admin`` implies the others."""

_ALGORITHM = "HS256"


CHANNEL_KEYS = ("admin_key", "subscriber_key", "ref")
"""The keys made with each channel: manage it, subscribe to it, publish to it."""

DEVICE_SCOPE = "device"
"""The scope of a device's connection key; its record's id is the device id."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: an app key (``kind="key"``), an app's user (``kind="user"``) or
    a device, by its connection key (``kind="device"``, no scopes).

    A channel key is a key whose only scope is one of `CHANNEL_KEYS`, valid on
    ``channel`` alone.
    """

    app: str
    kind: str
    id: str
    scopes: tuple[str, ...] = ()
    channel: str | None = None

    def holds(self, channel_key: str, channel: Channel) -> bool:
        """Whether this is that channel key of that channel."""
        return self.channel == channel.name and channel_key in self.scopes

    @property
    def author(self) -> dict[str, str]:
        """How messages published by this principal name their author."""
        return {"type": self.kind, "id": self.id}

    def has(self, scope: str) -> bool:
        """Whether the principal holds ``scope`` (admin holds every scope)."""
        return scope in self.scopes or "admin" in self.scopes

    @property
    def is_user(self) -> bool:
        """A user token, not a server key."""
        return self.kind == "user"

    @property
    def is_device(self) -> bool:
        """A device, by its connection key."""
        return self.kind == "device"


def new_key() -> str:
    """A fresh secret key (192 random bits, URL-safe)."""
    return "hk_" + secrets.token_urlsafe(24)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def principal_for_key(key: str, record: KeyRecord | None) -> Principal:
    """The principal a presented key stands for; `Unauthorized` if it matches no record.

    The record was found by hash; comparing the hashes again in constant time
    keeps the check honest even if a store's lookup were not exact.
    """
    if record is None or not hmac.compare_digest(record.key_hash, hash_key(key)):
        raise Unauthorized("invalid credentials")
    if record.scopes[0] == DEVICE_SCOPE:
        return Principal(record.app, "device", record.id)
    channel = record.name if record.scopes[0] in CHANNEL_KEYS else None
    return Principal(record.app, "key", record.id, record.scopes, channel)


def looks_like_token(credential: str) -> bool:
    """JWTs have three dot-separated parts; keys have none."""
    return credential.count(".") == 2


def token_issuer(token: str) -> str:
    """The app named by a token's ``iss``, read before the signature can be checked."""
    try:
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        raise Unauthorized("invalid token") from None
    if not isinstance(issuer, str):
        raise Unauthorized("invalid token: no issuer")
    return issuer


def principal_for_token(token: str, app: App | None) -> Principal:
    """The user a token stands for, once its signature and expiry check out."""
    if app is None:
        raise Unauthorized("invalid token")
    try:
        claims = jwt.decode(
            token,
            app.token_secret,
            algorithms=[_ALGORITHM],
            issuer=app.name,
            options={"require": ["sub", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired") from None
    except jwt.PyJWTError:
        raise Unauthorized("invalid token") from None
    user = claims["sub"]
    if not isinstance(user, str) or not 0 < len(user) <= 128:
        raise Unauthorized("invalid token: sub must be a user id")
    return Principal(app=app.name, kind="user", id=user)


def mint_token(app: App, user_id: str, ttl: int) -> tuple[str, int]:
    """A token for ``user_id`` valid ``ttl`` seconds, and its expiry (unix seconds)."""
    now = int(time.time())
    claims = {"sub": user_id, "iss": app.name, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, app.token_secret, algorithm=_ALGORITHM), now + ttl


def require_scope(principal: Principal, scope: str) -> None:
    """Raise `Forbidden` unless the principal holds ``scope``."""
    if not principal.has(scope):
        raise Forbidden(f"this credential lacks the {scope!r} scope")


def _allows(acl: ACL, principal: Principal) -> bool:
    if acl.public:
        return True
    if not principal.is_user:
        return False
    return acl.any_user or principal.id in acl.user_ids


def _owns(principal: Principal, channel: Channel) -> bool:
    return channel.owner == principal.author


def can_edit(principal: Principal, channel: Channel) -> bool:
    """Admin keys and the channel's admin_key; users who own it or are among its editors."""
    if not principal.is_user:
        return principal.has("admin") or principal.holds("admin_key", channel)
    return _owns(principal, channel) or _allows(channel.editors, principal)


def can_read(principal: Principal, channel: Channel) -> bool:
    """Subscribe and read history: admin keys; subscribe keys where anyone
    authenticated may read; users the readers ACL names, owners and editors;
    devices where readers are public (and, checked by the node, where they were
    added as persistent subscribers or show the channel's subscriber_key)."""
    if principal.is_device:
        return channel.readers.public
    if not principal.is_user:
        if principal.has("admin") or principal.holds("subscriber_key", channel):
            return True
        if principal.holds("admin_key", channel):
            return True
        readers = channel.readers
        return "subscribe" in principal.scopes and (readers.public or readers.any_user)
    return _allows(channel.readers, principal) or can_edit(principal, channel)


def can_publish(principal: Principal, channel: Channel) -> bool:
    """Server keys with the publish scope and the channel's ref and admin_key always;
    users only on ``custom_publish`` channels whose writers ACL lets them (or that
    they own); devices only on ``custom_publish`` channels with public writers."""
    if principal.is_device:
        return channel.custom_publish and channel.writers.public
    if not principal.is_user:
        return (
            principal.has("publish")
            or principal.holds("ref", channel)
            or principal.holds("admin_key", channel)
        )
    if not channel.custom_publish:
        return False
    return _owns(principal, channel) or _allows(channel.writers, principal)
