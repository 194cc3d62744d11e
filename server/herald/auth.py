"""Credentials to principals, and the checks made on them.

Keys are random (192 bits), shown once, stored as SHA-256 hashes: a slow
hash buys nothing for secrets that long, and lookups stay one hash away.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from herald.errors import Forbidden, Unauthorized
from herald.models import KeyRecord

__all__ = ["SCOPES", "Principal", "hash_key", "new_key", "principal_for_key", "require_scope"]

SCOPES = ("admin", "publish", "subscribe")
"""App key scopes. ``admin`` implies the others."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: an app key for now (user tokens and devices come later)."""

    app: str
    kind: str
    id: str
    scopes: tuple[str, ...] = ()

    @property
    def author(self) -> dict[str, str]:
        """How messages published by this principal name their author."""
        return {"type": self.kind, "id": self.id}

    def has(self, scope: str) -> bool:
        """Whether the principal holds ``scope`` (admin holds every scope)."""
        return scope in self.scopes or "admin" in self.scopes


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
    return Principal(app=record.app, kind="key", id=record.id, scopes=record.scopes)


def require_scope(principal: Principal, scope: str) -> None:
    """Raise `Forbidden` unless the principal holds ``scope``."""
    if not principal.has(scope):
        raise Forbidden(f"this key lacks the {scope!r} scope")
