"""Logging set-up: one line per event, as text or as JSON, with the request id of
the HTTP request being served (if any)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

import orjson

__all__ = ["JSONFormatter", "RequestIdFilter", "configure", "request_id"]

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the HTTP request this task serves (set by `herald.access.AccessLog`)."""


class RequestIdFilter(logging.Filter):
    """Puts the current request id on each record (``request_id``, and ``rid`` as
    text ready for the line: `` [id]`` or nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate; never drops a record."""
        ident = request_id.get()
        record.request_id = ident
        record.rid = f" [{ident}]" if ident else ""
        return True


class JSONFormatter(logging.Formatter):
    """Each record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """``{ts, level, logger, msg, request_id?, exc?}``."""
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ident = getattr(record, "request_id", None)
        if ident:
            entry["request_id"] = ident
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(fmt: str, level: str) -> dict[str, object]:
    """Set up the root logger and return a uvicorn ``log_config`` that defers to it."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")
        )
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return {"version": 1, "disable_existing_loggers": False}
