"""The exception tree and the one table that maps each error to its codes.

Call sites raise; handlers (HTTP middleware, the WebSocket transport) map.
Nobody builds an error response by hand.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BadRequest",
    "CloseCode",
    "Conflict",
    "Forbidden",
    "GatewayTimeout",
    "Gone",
    "HeraldError",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
]


class CloseCode(IntEnum):
    """WebSocket close codes Herald sends, standard and application-defined."""

    NORMAL = 1000
    """Normal closure."""
    PROTOCOL_ERROR = 1002
    """The peer broke RFC 6455."""
    INVALID_DATA = 1007
    """A text frame was not valid UTF-8."""
    MESSAGE_TOO_BIG = 1009
    """A frame was larger than ``max_frame_bytes``."""
    INTERNAL_ERROR = 1011
    """Something broke inside the server."""
    SERVICE_RESTART = 1012
    """The server is restarting: reconnect elsewhere with ``since``."""
    BAD_FRAME = 4000
    """Too many unparsable frames or unknown ops in a row."""
    UNAUTHORIZED = 4001
    """Missing, wrong or late credentials."""
    FORBIDDEN = 4003
    """Valid credentials without the right."""
    SLOW_CONSUMER = 4008
    """The unsent backlog passed ``outbox_limit_bytes``: reconnect with ``since``."""
    TOO_MANY_CONNECTIONS = 4009
    """Too many connections from one address."""


class HeraldError(Exception):
    """Base of every error Herald reports to a client.

    Carries the HTTP status, a machine-readable ``code``, a human ``detail``
    and, when one field is at fault, its ``path`` (``json.path`` style).
    """

    status: int = 500
    code: str = "internal_error"
    close_code: CloseCode | None = None

    def __init__(self, detail: str, *, path: str | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.status} {self.code}: {self.detail}{where}"

    def to_dict(self) -> dict[str, object]:
        """The error body: ``{detail, code, path?}``."""
        body: dict[str, object] = {"detail": self.detail, "code": self.code}
        if self.path is not None:
            body["path"] = self.path
        return body


class BadRequest(HeraldError):
    """The request is malformed or a field is invalid (400)."""

    status = 400
    code = "bad_request"


class Unauthorized(HeraldError):
    """Credentials are missing or wrong (401 / close 4001)."""

    status = 401
    code = "unauthorized"
    close_code = CloseCode.UNAUTHORIZED


class Forbidden(HeraldError):
    """Credentials are valid but lack the right (403 / close 4003)."""

    status = 403
    code = "forbidden"
    close_code = CloseCode.FORBIDDEN


class NotFound(HeraldError):
    """No such resource, or not one the caller may know of (404)."""

    status = 404
    code = "not_found"


class Conflict(HeraldError):
    """The resource exists already, or is in the wrong state (409)."""

    status = 409
    code = "conflict"


class Gone(HeraldError):
    """The channel was closed (410)."""

    status = 410
    code = "gone"


class PayloadTooLarge(HeraldError):
    """A body, payload or frame is over its limit (413)."""

    status = 413
    code = "payload_too_large"


class TooManyRequests(HeraldError):
    """429: a rate or a count limit was reached; ``retry_after`` seconds may help."""

    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class GatewayTimeout(HeraldError):
    """504: something Herald waited on (a device's reply) did not answer in time."""

    status = 504
    code = "timeout"


class Unavailable(HeraldError):
    """The engine cannot be reached; retry later (503 with Retry-After)."""

    status = 503
    code = "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class ProtocolError(BadRequest):
    """A WebSocket frame that does not parse or names an unknown op.

    Counts toward ``max_bad_frames`` (close 4000); other errors do not.
    """

    code = "bad_frame"
