"""Settings: one frozen dataclass, filled from flags and ``HERALD_*`` variables.

Every limit has a default and a unit in its docstring; nothing else in the
code base carries a bare limit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ConfigError", "Settings"]


class ConfigError(ValueError):
    """A setting has a value Herald cannot run with."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a running Herald needs to know. Immutable once built."""

    host: str = "127.0.0.1"
    """Interface to bind. Default 127.0.0.1 (loopback only)."""

    port: int = 8000
    """TCP port for HTTP and WebSocket alike. Default 8000."""

    workers: int = 1
    """Worker processes. More than one needs the Redis engine. Default 1."""

    redis_url: str | None = None
    """Redis URL; unset means the embedded memory engine. Default unset."""

    redis_cluster: str | None = None
    """Redis Cluster startup nodes, comma-separated URLs
    (``redis://127.0.0.1:7000,redis://127.0.0.1:7001``); replaces ``redis_url``.
    Default unset."""

    admin_key: str | None = None
    """The bootstrap app's admin key; generated and printed when unset."""

    log_format: str = "text"
    """``text`` or ``json``: one line per event either way. Default text."""

    log_level: str = "info"
    """Minimum level logged. Default info."""

    access_log: bool = False
    """One log line per HTTP request (method, path, status, duration, request id).
    Default off."""

    max_payload_bytes: int = 64 * 1024
    """Largest publish payload, in bytes, once encoded as JSON. Default 64 KiB."""

    max_frame_bytes: int = 1024 * 1024
    """Largest WebSocket message a client may send, in bytes (close 1009). Default 1 MiB."""

    max_body_bytes: int = 2 * 1024 * 1024
    """Largest HTTP request body, in bytes (413 past it). Default 2 MiB."""

    max_subscriptions: int = 1000
    """Subscriptions one connection may hold at once. Default 1000."""

    outbox_limit_bytes: int = 1024 * 1024
    """Unsent bytes a connection may have queued before it is closed 4008. Default 1 MiB."""

    connect_timeout: float = 10.0
    """Seconds a new socket has to send its ``connect`` frame (close 4001). Default 10."""

    ping_interval: float = 25.0
    """Seconds between transport pings; a peer that sent nothing (not even a pong) since
    the previous ping is dropped. Default 25."""

    idle_sweep_interval: float = 1.0
    """Seconds between looks for channels past their ``idle_timeout``. Default 1."""

    presence_interval: float = 2.0
    """Seconds between reports of each worker's connection counts (for ``counts``). Default 2."""

    max_bad_frames: int = 3
    """Consecutive bad frames before close 4000. Default 3."""

    max_annotations_bytes: int = 8 * 1024
    """Largest ``annotations`` list on a channel, in bytes of JSON. Default 8 KiB."""

    max_metadata_bytes: int = 4 * 1024
    """Largest ``metadata`` object on a message, in bytes of JSON. Default 4 KiB."""

    max_history_size: int = 100_000
    """Largest ``history_size`` a channel may ask for, in messages. Default 100 000."""

    publish_rate: float = 0.0
    """Publishes per second one credential (key, user or device) may make on one
    worker, with bursts of one second's worth; past it 429 with ``Retry-After``.
    Each worker counts its own. Default 0: unlimited."""

    max_connections_per_ip: int = 0
    """WebSocket connections one client address may hold on one worker (close 4009
    past it). Default 0: unlimited."""

    allowed_origins: str = ""
    """Comma-separated ``Origin`` values browsers may connect from (403 at the
    handshake otherwise); clients that send no Origin are not browsers and are let
    in. Default empty: any origin."""

    max_pending_commands: int = 100
    """Commands a device may have unanswered at once (429 past it). Default 100."""

    websocket_compression: bool = False
    """Offer permessage-deflate. Off by default: it costs ~50 KiB per connection and
    makes every subscriber's frame different, which defeats encode-once fan-out."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``HERALD_<FIELD>`` variables, then explicit overrides.

        Overrides whose value is ``None`` are ignored, so unset flags fall through
        to the environment and then to the defaults.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = env.get(f"HERALD_{field.name.upper()}")
            if raw is not None and raw != "":
                values[field.name] = _coerce(field.name, field.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise `ConfigError` for a combination Herald refuses to run with."""
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.redis_url and self.redis_cluster:
            raise ConfigError("pass --redis or --redis-cluster, not both")
        if self.workers > 1 and not self.engine.startswith("redis"):
            raise ConfigError(
                "--workers > 1 needs the Redis engine: the memory engine lives in one "
                "process, so workers would not see each other's messages. "
                "Pass --redis URL (or HERALD_REDIS_URL), or run one worker."
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError("--log-format must be 'text' or 'json'")
        for name in (
            "max_payload_bytes",
            "max_frame_bytes",
            "outbox_limit_bytes",
            "max_pending_commands",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("publish_rate", "max_connections_per_ip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (unlimited) or more")

    @property
    def engine(self) -> str:
        """``redis-cluster``, ``redis`` or ``memory``: which engine these settings pick."""
        if self.redis_cluster:
            return "redis-cluster"
        return "redis" if self.redis_url else "memory"

    @property
    def origins(self) -> list[str]:
        """``allowed_origins`` as a list (empty: any origin)."""
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    def to_env(self) -> dict[str, str]:
        """``HERALD_*`` variables that rebuild these settings (for worker processes)."""
        env = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            env[f"HERALD_{field.name.upper()}"] = str(value)
        return env

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _coerce(name: str, annotation: object, raw: str) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"HERALD_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
