"""The HTTP API described as OpenAPI 3.1, served at ``GET /openapi.json``.

The schemas say what the validation code enforces (`herald.channels`,
`herald.models`, `herald.registration`, `herald.tags`, `herald.audience`,
`herald.identity`, `herald.commands`, `herald.devices`) and no more: what a
JSON Schema cannot say (a size counted in bytes of JSON, an audience's depth)
is in the descriptions. Limits that are settings come from the server's own
`Settings`, so the document describes the server that serves it.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald import __version__
from herald.api import node_of
from herald.config import Settings
from herald.openapi_paths import error_components, paths
from herald.openapi_schemas import JSON, schemas

__all__ = ["build_document", "routes"]


@functools.lru_cache(maxsize=4)
def _encoded(settings: Settings) -> bytes:
    return orjson.dumps(build_document(settings))


def build_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API of a server run with ``settings``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Herald",
            "version": __version__,
            "summary": "Realtime WebSocket pub/sub: the HTTP API.",
            "description": (
                'Successful answers are `{"data": ..., "meta": {"code": N}}` '
                '(listings add `meta.next`); errors are `{"detail", "code", "path"?}`. '
                "Bodies and answers are JSON, or MessagePack when `Content-Type` (for the "
                "body) or `Accept` (for the answer) is `application/msgpack`. The WebSocket "
                "protocol (`/v1/connect`) is not described here."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "tags": [
            {"name": "health", "description": "Liveness, readiness and this document."},
            {"name": "apps", "description": "Tenants (operator key)."},
            {"name": "keys", "description": "App keys (admin scope)."},
            {"name": "tokens", "description": "User tokens (admin scope)."},
            {"name": "channels", "description": "Channels and their settings."},
            {"name": "messages", "description": "Publishing and history."},
            {"name": "subscribers", "description": "Persistent subscribers of a channel."},
            {"name": "devices", "description": "Devices, their tags and commands."},
        ],
        "paths": paths(settings),
        "components": {
            "schemas": schemas(settings),
            "responses": error_components(settings),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An app key, a channel key, a device's connection key "
                    "or a user token (JWT).",
                },
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "A key, when `Authorization` is not a bearer credential.",
                },
            },
        },
    }


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: the document, built once per settings."""
    return Response(_encoded(node_of(request).settings), media_type=JSON)


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
"""The route serving the document."""
