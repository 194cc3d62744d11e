"""Request ids and the access log: an ASGI wrapper around the whole HTTP app.

Every HTTP request gets an id — the caller's ``X-Request-Id`` when it sends a
usable one, else a fresh one — that is echoed in the response's
``X-Request-Id`` and carried by every log line written while the request is
served (`herald.logs` adds it). With ``access_log`` on, each request also
writes one line: method, path, status and duration.
"""

from __future__ import annotations

import logging
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.logs import request_id

__all__ = ["AccessLog"]

logger = logging.getLogger("herald.access")

_HEADER = b"x-request-id"


def _given_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            text: str = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return None


class AccessLog:
    """Gives each HTTP request an id (and, if asked, a line in the log)."""

    def __init__(self, app: ASGIApp, *, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request with its id set; pass other scopes through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ident = _given_id(scope) or secrets.token_hex(8)
        token = request_id.set(ident)
        header = (_HEADER, ident.encode("latin-1"))
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                logger.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    (time.perf_counter() - started) * 1000,
                )
            request_id.reset(token)
