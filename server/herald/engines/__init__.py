"""Engines: where messages, history and records live. See `herald.engines.base`."""

from __future__ import annotations

from herald.engines.base import Engine, MessageHandler
from herald.engines.memory import MemoryEngine

__all__ = ["Engine", "MemoryEngine", "MessageHandler"]
