"""What the client raises.

Everything derives from `ClientError`, so ``except ClientError`` catches all of
it. `FatalError` is the one that ends a client for good; `ConnectionLost` only
means one request's connection went away (the client reconnects by itself).
"""

from __future__ import annotations

__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "FatalError",
    "HeraldHTTPError",
    "RequestError",
]


class ClientError(Exception):
    """Base of every error of `herald.client`."""


class RequestError(ClientError):
    """The server answered a WebSocket request with an ``error`` frame.

    ``code`` is machine-readable (``not_found``, ``forbidden``, ``conflict``, ...),
    ``detail`` human, ``path`` the field at fault when there is one.
    """

    def __init__(self, code: str, detail: str, path: str | None = None) -> None:
        where = f" at {path}" if path else ""
        super().__init__(f"{code}: {detail}{where}")
        self.code = code
        self.detail = detail
        self.path = path


class ConnectionLost(ClientError):
    """The connection carrying a request closed before its answer came.

    For a publish this means "unknown": the message may or may not be stored.
    The client itself reconnects; retrying is the caller's decision.
    """


class ClientClosed(ClientError):
    """The client was closed (by `Client.close`) before or while it was used."""


class FatalError(ClientError):
    """The server refused this client in a way a reconnect cannot fix.

    Close 4001 (credentials missing, wrong, revoked, or the device uninstalled),
    4003 (valid credentials without the right), or an HTTP status refusing the
    WebSocket upgrade (404 wrong path, 403 origin, ...). ``close_code`` is the
    WebSocket close code (None when the upgrade itself was refused, then
    ``status`` is the HTTP status); ``code`` and ``detail`` come from the
    server's ``error`` frame when it sent one.
    """

    def __init__(
        self,
        detail: str,
        *,
        close_code: int | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        what = f"close {close_code}" if close_code is not None else f"HTTP {status}"
        super().__init__(f"{what}: {code + ': ' if code else ''}{detail}")
        self.close_code = close_code
        self.status = status
        self.code = code
        self.detail = detail


class HeraldHTTPError(ClientError):
    """An HTTP API call answered an error: ``status``, and from the body ``code``,
    ``detail`` and ``path`` (the field at fault, when one is). ``retry_after``
    holds the ``Retry-After`` seconds of a 429 or 503."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        path: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        where = f" at {path}" if path else ""
        super().__init__(f"{status} {code}: {detail}{where}")
        self.status = status
        self.code = code
        self.detail = detail
        self.path = path
        self.retry_after = retry_after
