"""The operator's web page and the browser client: ``GET /dashboard`` and ``/static/*``.

The files live in ``herald/static`` and ship with the package. Only files that
are there, with a known type, are served (no directory walking). Every answer
carries a Content-Security-Policy that lets the page run scripts and styles from
this origin only, talk to this origin only (HTTP and WebSocket) and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald.errors import NotFound

__all__ = ["CONTENT_SECURITY_POLICY", "routes"]

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",  # same-origin fetch and WebSocket (CSP 3 'self' covers ws/wss)
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate every time (cheap: an ETag match answers 304), so an upgraded
    # server never leaves a browser with an old herald.js.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


@functools.cache
def _asset(name: str) -> _Asset | None:
    """The file ``static/<name>``, read once; None when there is no such file to serve."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if name.startswith(".") or "/" in name or "\\" in name or suffix not in _CONTENT_TYPES:
        return None
    entry = resources.files("herald").joinpath("static", name)
    if not entry.is_file():
        return None
    body = entry.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _Asset(body, _CONTENT_TYPES[suffix], etag)


def _serve(request: Request, name: str) -> Response:
    asset = _asset(name)
    if asset is None:
        raise NotFound("Not found")
    headers = {**_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, 200, headers, asset.content_type)


async def dashboard(request: Request) -> Response:
    """``GET /dashboard``: the operator's page (it asks for the admin key itself)."""
    return _serve(request, "dashboard.html")


async def static(request: Request) -> Response:
    """``GET /static/{name}``: herald.js and the dashboard's script and style."""
    return _serve(request, request.path_params["name"])


routes = [
    Route("/dashboard", dashboard, methods=["GET"]),
    Route("/static/{name}", static, methods=["GET"]),
]
"""The web routes: not part of the JSON API (nor of ``/openapi.json``)."""
