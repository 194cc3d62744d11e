"""Herald: a realtime WebSocket pub/sub server with per-channel history and recovery."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
