"""The HTTP API: Starlette routes. Thin: parse, authorise, call the node, shape the answer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from herald.auth import Principal
from herald.channels import parse_channel
from herald.codec import packb
from herald.errors import (
    BadRequest,
    HeraldError,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from herald.metrics import ENGINE_ERRORS
from herald.models import Channel, Message, parse_offset
from herald.node import Node

__all__ = [
    "HotPaths",
    "authenticate",
    "error_handlers",
    "node_of",
    "read_body",
    "respond",
    "routes",
]

logger = logging.getLogger("herald.api")

MSGPACK = "application/msgpack"
_MAX_PAGE = 200
_MAX_HISTORY = 1000
_MAX_BATCH = 1000


def node_of(request: Request) -> Node:
    """The worker's node. Read straight from the scope: `request.state` builds a
    State object per request."""
    node: Node = request.scope["state"]["node"]
    return node


def _wants_msgpack(request: Request) -> bool:
    return MSGPACK in request.headers.get("accept", "")


def respond(
    request: Request,
    data: Any,
    status: int = 200,
    *,
    meta: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """``{"data": ..., "meta": {"code": status, ...}}`` in JSON, or msgpack if accepted;
    ``extra`` adds top-level members (``warnings``)."""
    body = {"data": data, "meta": {"code": status, **(meta or {})}, **(extra or {})}
    if _wants_msgpack(request):
        return Response(packb(body), status, headers, MSGPACK)
    return Response(orjson.dumps(body), status, headers, "application/json")


def _error_response(request: Request, error: HeraldError) -> Response:
    headers = {}
    if isinstance(error, Unavailable):
        ENGINE_ERRORS.inc()
    if isinstance(error, Unavailable | TooManyRequests):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    body = error.to_dict()
    if _wants_msgpack(request):
        return Response(packb(body), error.status, headers, MSGPACK)
    return Response(orjson.dumps(body), error.status, headers, "application/json")


async def _herald_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HeraldError)
    return _error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = HeraldError(
        "Not found" if exc.status_code == 404 else str(exc.detail),
        code=codes.get(exc.status_code, "http_error"),
    )
    error.status = exc.status_code
    return _error_response(request, error)


error_handlers = {HeraldError: _herald_error, HTTPException: _http_error}
"""Exception handlers for the Starlette app: every error becomes ``{detail, code, path?}``."""


async def read_body(request: Request) -> Any:
    """Parse the body as JSON, or MessagePack when the Content-Type says so."""
    limit = node_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    if request.headers.get("content-type", "").startswith(MSGPACK):
        try:
            return msgpack.unpackb(bytes(chunks), raw=False)
        except Exception as exc:  # msgpack raises many types; all mean "does not parse"
            raise BadRequest(f"MessagePack parse error: {exc}") from None
    try:
        return orjson.loads(chunks)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"JSON parse error: {exc}") from None


async def authenticate(request: Request) -> Principal:
    """The principal of ``Authorization: Bearer <key>`` or ``X-API-Key``; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    key = credential.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key")
    if not key:
        raise Unauthorized("missing credentials: send Authorization: Bearer <key>")
    return await node_of(request).authenticate(key)


def _query_int(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"{name} must be an integer from 1 to {maximum}", path=name)
    return int(raw)


def _query_bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise BadRequest(f"{name} must be 0, 1, true or false", path=name)
    return raw in ("1", "true")


def _query_offset(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    parse_offset(raw, name)
    return raw


async def channel_view(node: Node, channel: Channel, principal: Principal) -> dict[str, Any]:
    """A channel as the API shows it; users also learn whether they may edit it."""
    record = channel.to_record()
    del record["app"], record["messages"]
    record.update(await node.live_fields(channel, principal))
    return record


async def create_channel(request: Request) -> Response:
    """``POST /v1/channels`` → 201 with the channel; 409 if the name is taken."""
    principal = await authenticate(request)
    node = node_of(request)
    channel = parse_channel(await read_body(request), principal.app, node.settings)
    channel, keys = await node.create_channel(principal, channel)
    return respond(
        request,
        {**(await channel_view(node, channel, principal)), "keys": keys},
        201,
        headers={"Location": f"/v1/channels/{channel.name}"},
    )


async def list_channels(request: Request) -> Response:
    """``GET /v1/channels``: a page of channels, ``meta.next`` is the next cursor."""
    principal = await authenticate(request)
    node = node_of(request)
    kind = request.query_params.get("type")
    if kind is not None and kind not in ("default", "separate_rooms"):
        raise BadRequest("type must be 'default' or 'separate_rooms'", path="type")
    channels, cursor = await node.list_channels(
        principal,
        after=request.query_params.get("cursor") or None,
        limit=_query_int(request, "limit", 50, _MAX_PAGE),
        include_inactive=_query_bool(request, "include_inactive"),
        kind=kind,
    )
    return respond(
        request, [await channel_view(node, c, principal) for c in channels], meta={"next": cursor}
    )


async def get_channel(request: Request) -> Response:
    """``GET /v1/channels/{name}``."""
    principal = await authenticate(request)
    node = node_of(request)
    channel = await node.channel(principal, request.path_params["name"])
    return respond(request, await channel_view(node, channel, principal))


async def update_channel(request: Request) -> Response:
    """``PUT``/``PATCH /v1/channels/{name}``: change the fields given (both are partial)."""
    principal = await authenticate(request)
    node = node_of(request)
    channel = await node.update_channel(
        principal, request.path_params["name"], await read_body(request)
    )
    return respond(request, await channel_view(node, channel, principal))


async def close_channel(request: Request) -> Response:
    """``DELETE /v1/channels/{name}``: close it for good; answers the closed channel."""
    principal = await authenticate(request)
    node = node_of(request)
    channel = await node.close_channel(principal, request.path_params["name"])
    return respond(request, await channel_view(node, channel, principal))


def _shown(request: Request) -> tuple[Callable[[Message], dict[str, Any]], dict[str, str]]:
    """How a publish answers each message, and the headers saying so.

    ``Prefer: return=minimal`` (RFC 7240) asks for each message's id alone, not
    the whole message with its payload.
    """
    prefer = request.headers.get("prefer")
    # Preferences are comma-separated, each maybe with ";"-parameters.
    if prefer is not None and any(
        part.split(";", 1)[0].strip().lower().replace(" ", "") == "return=minimal"
        for part in prefer.split(",")
    ):
        return _id_alone, {"Preference-Applied": "return=minimal"}
    return Message.to_api, {}


def _id_alone(message: Message) -> dict[str, Any]:
    return {"id": message.id}


async def publish(request: Request) -> Response:
    """``POST /v1/channels/{name}/publish`` → 201 with the message, once it is stored
    (its id alone with ``Prefer: return=minimal``)."""
    principal = await authenticate(request)
    body = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be an object")
    if "channel" in body:
        raise BadRequest("unknown field 'channel': the channel is in the path", path="channel")
    item = {**body, "channel": request.path_params["name"]}
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is None:
        message = await node_of(request).publisher.publish_item(principal, item)
    else:
        message = await node_of(request).publisher.publish_once(principal, item, idempotency_key)
    shown, headers = _shown(request)
    return respond(request, shown(message), 201, headers=headers)


async def publish_batch(request: Request) -> Response:
    """``POST /v1/publish``: a list of publishes; one ``{status, data | error}`` per item.

    With ``Prefer: return=minimal`` a published item's ``data`` is ``{id}``: a batch
    answer then does not echo every payload back (most of its bytes otherwise).
    """
    principal = await authenticate(request)
    body = await read_body(request)
    if not isinstance(body, list):
        raise BadRequest("the body must be a list of publishes")
    if len(body) > _MAX_BATCH:
        raise PayloadTooLarge(f"a batch holds at most {_MAX_BATCH} publishes")
    results = await node_of(request).publisher.publish_many(principal, body)
    shown, headers = _shown(request)
    return respond(
        request,
        [
            {"status": r.status, "error": r.to_dict()}
            if isinstance(r, HeraldError)
            else {"status": 201, "data": shown(r)}
            for r in results
        ],
        headers=headers,
    )


async def history(request: Request) -> Response:
    """``GET /v1/channels/{name}/history``: retained messages, oldest first unless reversed."""
    principal = await authenticate(request)
    messages = await node_of(request).history(
        principal,
        request.path_params["name"],
        room=request.query_params.get("room"),
        since=_query_offset(request, "since"),
        until=_query_offset(request, "until"),
        limit=_query_int(request, "limit", 100, _MAX_HISTORY),
        reverse=_query_bool(request, "reverse"),
    )
    return respond(request, [m.to_api() for m in messages])


async def get_message(request: Request) -> Response:
    """``GET /v1/channels/{name}/messages/{id}``: one retained message (a message's ``self``)."""
    principal = await authenticate(request)
    message = await node_of(request).message(
        principal,
        request.path_params["name"],
        request.path_params["id"],
        request.query_params.get("room"),
    )
    return respond(request, message.to_api())


async def create_app(request: Request) -> Response:
    """``POST /v1/apps`` (operator key): the app and its first admin key, shown once."""
    principal = await authenticate(request)
    app, record, key = await node_of(request).identity.create_app(
        principal, await read_body(request)
    )
    return respond(request, {**app.to_api(), "admin_key": {**record.to_api(), "key": key}}, 201)


async def list_apps(request: Request) -> Response:
    """``GET /v1/apps`` (operator key)."""
    principal = await authenticate(request)
    apps = await node_of(request).identity.list_apps(principal)
    return respond(request, [app.to_api() for app in apps])


async def create_key(request: Request) -> Response:
    """``POST /v1/keys`` ``{scopes, name?}`` (admin): the key, shown once."""
    principal = await authenticate(request)
    record, key = await node_of(request).identity.create_key(principal, await read_body(request))
    return respond(request, {**record.to_api(), "key": key}, 201)


async def list_keys(request: Request) -> Response:
    """``GET /v1/keys`` (admin): the app's keys, without secrets."""
    principal = await authenticate(request)
    keys = await node_of(request).identity.list_keys(principal)
    return respond(request, [key.to_api() for key in keys])


async def delete_key(request: Request) -> Response:
    """``DELETE /v1/keys/{id}`` (admin): the key stops working everywhere at once."""
    principal = await authenticate(request)
    record = await node_of(request).identity.delete_key(principal, request.path_params["id"])
    return respond(request, record.to_api())


async def create_token(request: Request) -> Response:
    """``POST /v1/tokens`` ``{user_id, ttl?}`` (admin): a user token for a front end."""
    principal = await authenticate(request)
    token = await node_of(request).identity.mint(principal, await read_body(request))
    return respond(request, token, 201)


async def healthz(request: Request) -> Response:
    """Alive: the process answers."""
    return respond(request, {"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: the engine answers (503 otherwise)."""
    await node_of(request).engine.ping()
    return respond(request, {"status": "ready"})


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/v1/apps", create_app, methods=["POST"]),
    Route("/v1/apps", list_apps, methods=["GET"]),
    Route("/v1/keys", create_key, methods=["POST"]),
    Route("/v1/keys", list_keys, methods=["GET"]),
    Route("/v1/keys/{id}", delete_key, methods=["DELETE"]),
    Route("/v1/tokens", create_token, methods=["POST"]),
    Route("/v1/channels", create_channel, methods=["POST"]),
    Route("/v1/channels", list_channels, methods=["GET"]),
    Route("/v1/channels/{name}", get_channel, methods=["GET"]),
    Route("/v1/channels/{name}", update_channel, methods=["PUT", "PATCH"]),
    Route("/v1/channels/{name}", close_channel, methods=["DELETE"]),
    Route("/v1/channels/{name}/publish", publish, methods=["POST"]),
    Route("/v1/publish", publish_batch, methods=["POST"]),
    Route("/v1/channels/{name}/history", history, methods=["GET"]),
    Route("/v1/channels/{name}/messages/{id}", get_message, methods=["GET"]),
]
"""Every HTTP route of the API."""


class HotPaths:
    """ASGI front for the two publish endpoints: the same handlers, called directly.

    Publishing is the request backends make most; skipping the middleware
    stack and the walk over every route roughly halves Starlette's share of
    it. Errors are shaped by the same function the exception handlers use.
    Everything else goes to the wrapped app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a publish, or pass the request on."""
        endpoint = None
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path == "/v1/publish":
                endpoint, params = publish_batch, {}
            elif path.startswith(_CHANNELS) and path.endswith(_PUBLISH):
                name = path[len(_CHANNELS) : -len(_PUBLISH)]
                if name and "/" not in name:
                    endpoint, params = publish, {"name": name}
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = params
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except HeraldError as exc:
            response = _error_response(request, exc)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            response = _error_response(request, HeraldError("internal error"))
        await response(scope, receive, send)


_CHANNELS = "/v1/channels/"
_PUBLISH = "/publish"
