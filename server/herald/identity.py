"""Apps, app keys and user tokens: who may call Herald, and the operations on them.

Valid keys are remembered for ``_KEY_TTL`` seconds so a busy client does not
cost a store lookup per request; deleting a key broadcasts an event that
makes every worker forget it at once.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from herald.auth import (
    CHANNEL_KEYS,
    DEVICE_SCOPE,
    SCOPES,
    Principal,
    hash_key,
    looks_like_token,
    mint_token,
    new_key,
    principal_for_key,
    principal_for_token,
    require_scope,
    token_issuer,
)
from herald.engines.base import Engine
from herald.errors import BadRequest, Conflict, Forbidden, NotFound
from herald.models import App, Channel, KeyRecord, check_name

__all__ = [
    "BOOTSTRAP_APP",
    "BOOTSTRAP_KEY_ID",
    "Identity",
    "ensure_bootstrap_key",
    "install_bootstrap_key",
]

BOOTSTRAP_APP = "default"
"""The app that exists from first start; its bootstrap key is the operator's."""

BOOTSTRAP_KEY_ID = "bootstrap"

_KEY_TTL = 1.0  # seconds a validated key is trusted without a store lookup
_MAX_CACHED_KEYS = 10_000
_MAX_TOKEN_TTL = 30 * 86400
_DEFAULT_TOKEN_TTL = 3600


async def install_bootstrap_key(engine: Engine, key: str) -> None:
    """Make ``key`` the bootstrap app's admin key (replacing any earlier one)."""
    await engine.create_app(App(BOOTSTRAP_APP))
    await engine.add_key(
        KeyRecord(id=BOOTSTRAP_KEY_ID, app=BOOTSTRAP_APP, scopes=("admin",), key_hash=hash_key(key))
    )


async def ensure_bootstrap_key(engine: Engine, key: str | None) -> str | None:
    """Install ``key``, or generate one if the engine has no bootstrap key yet.

    Returns the generated key (to be shown once), or ``None`` when nothing was
    generated: a key was given, or one exists from an earlier start.
    """
    if key:
        await install_bootstrap_key(engine, key)
        return None
    if await engine.find_key_by_id(BOOTSTRAP_KEY_ID) is not None:
        return None
    generated = new_key()
    await install_bootstrap_key(engine, generated)
    return generated


def _is_operator(principal: Principal) -> bool:
    return principal.app == BOOTSTRAP_APP and principal.id == BOOTSTRAP_KEY_ID


def _parse_scopes(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(scope, str) and scope in SCOPES for scope in value)
    ):
        raise BadRequest(f"scopes must be a non-empty list of {', '.join(SCOPES)}", path="scopes")
    return tuple(dict.fromkeys(value))


class Identity:
    """Authentication and the apps, keys and tokens endpoints, over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._principals: dict[str, tuple[float, Principal]] = {}
        self._apps: dict[str, App] = {}

    async def authenticate(self, credential: str) -> Principal:
        """The principal behind an app key or a user token; `Unauthorized` otherwise."""
        if looks_like_token(credential):
            return principal_for_token(credential, await self._app(token_issuer(credential)))
        now = time.monotonic()
        cached = self._principals.get(credential)
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self.engine.find_key(hash_key(credential))
        principal = principal_for_key(credential, record)
        if len(self._principals) >= _MAX_CACHED_KEYS:
            self._principals.clear()
        self._principals[credential] = (now + _KEY_TTL, principal)
        return principal

    def on_control(self, event: dict[str, Any]) -> None:
        """Forget a deleted key on this worker (the event comes from every worker)."""
        if event.get("type") == "resync":
            self._principals.clear()
        if event.get("type") == "key_deleted":
            app, key_id = event.get("app"), event.get("id")
            for credential, (_, principal) in list(self._principals.items()):
                if principal.app == app and principal.id == key_id:
                    del self._principals[credential]

    async def _app(self, name: str) -> App | None:
        # Apps never change once made (the token secret included): cache them for good.
        app = self._apps.get(name)
        if app is None:
            app = await self.engine.get_app(name)
            if app is not None:
                self._apps[name] = app
        return app

    # Apps (operator only)

    async def create_app(self, principal: Principal, body: object) -> tuple[App, KeyRecord, str]:
        """A new app and its first admin key (the key is shown once)."""
        if not _is_operator(principal):
            raise Forbidden("only the operator key may create apps")
        if not isinstance(body, dict):
            raise BadRequest("the body must be an object")
        app = App(check_name(body.get("name"), "name"))
        if not await self.engine.create_app(app):
            raise Conflict(f"app {app.name!r} exists already", path="name")
        key = new_key()
        record = KeyRecord(
            id=_key_id(),
            app=app.name,
            scopes=("admin",),
            key_hash=hash_key(key),
            name="first admin key",
        )
        await self.engine.add_key(record)
        return app, record, key

    async def list_apps(self, principal: Principal) -> list[App]:
        """Every app (operator only)."""
        if not _is_operator(principal):
            raise Forbidden("only the operator key may list apps")
        return await self.engine.list_apps()

    # Keys (admin scope)

    async def create_key(self, principal: Principal, body: object) -> tuple[KeyRecord, str]:
        """A new key of the principal's app with the asked scopes (shown once)."""
        require_scope(principal, "admin")
        if principal.is_user:
            raise Forbidden("users cannot create keys")
        if not isinstance(body, dict):
            raise BadRequest("the body must be an object")
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 128:
            raise BadRequest("name must be a string of at most 128 characters", path="name")
        key = new_key()
        record = KeyRecord(
            id=_key_id(),
            app=principal.app,
            scopes=_parse_scopes(body.get("scopes")),
            key_hash=hash_key(key),
            name=name,
        )
        await self.engine.add_key(record)
        return record, key

    async def list_keys(self, principal: Principal) -> list[KeyRecord]:
        """The app keys of the principal's app (never their secrets; no channel or
        device keys)."""
        require_scope(principal, "admin")
        keys = await self.engine.list_keys(principal.app)
        return [key for key in keys if key.scopes[0] in SCOPES]

    async def channel_keys(self, channel: Channel) -> dict[str, str]:
        """Make the three keys of a new channel; answers them (this once)."""
        keys = {}
        for kind in CHANNEL_KEYS:
            key = new_key()
            await self.engine.add_key(
                KeyRecord(
                    id=f"ch_{secrets.token_hex(6)}",
                    app=channel.app,
                    scopes=(kind,),
                    key_hash=hash_key(key),
                    name=channel.name,
                )
            )
            keys[kind] = key
        return keys

    async def delete_key(self, principal: Principal, key_id: str) -> KeyRecord:
        """Delete a key; it stops working on every worker at once."""
        require_scope(principal, "admin")
        if principal.app == BOOTSTRAP_APP and key_id == BOOTSTRAP_KEY_ID:
            raise Conflict("the operator key is set with HERALD_ADMIN_KEY, not deleted")
        record = await self.engine.find_key_by_id(key_id)
        if record is None or record.app != principal.app or record.scopes[0] == DEVICE_SCOPE:
            # A device's key goes with the device: POST /v1/devices/uninstall.
            raise NotFound("Not found")
        record = await self.engine.delete_key(principal.app, key_id)
        if record is None:
            raise NotFound("Not found")
        await self.engine.broadcast({"type": "key_deleted", "app": record.app, "id": record.id})
        return record

    # Tokens

    async def mint(self, principal: Principal, body: object) -> dict[str, Any]:
        """A user token of the principal's app: ``{token, user_id, expires_at}``."""
        require_scope(principal, "admin")
        if principal.is_user:
            raise Forbidden("users cannot mint tokens")
        if not isinstance(body, dict):
            raise BadRequest("the body must be an object")
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not 0 < len(user_id) <= 128:
            raise BadRequest("user_id must be a string of 1-128 characters", path="user_id")
        ttl = body.get("ttl", _DEFAULT_TOKEN_TTL)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= _MAX_TOKEN_TTL:
            raise BadRequest(f"ttl must be seconds from 1 to {_MAX_TOKEN_TTL}", path="ttl")
        app = await self._app(principal.app)
        if app is None:
            raise NotFound("Not found")
        token, expires = mint_token(app, user_id, ttl)
        return {"token": token, "user_id": user_id, "expires_at": expires}


def _key_id() -> str:
    return "key_" + secrets.token_hex(6)
