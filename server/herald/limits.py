"""Rate limits: a token bucket per credential. No I/O; the clock is passed in.

Each worker keeps its own buckets: a limit costs no round trip to a shared
store, and with N workers a credential may reach N times the rate when its
requests are spread over all of them (HTTP keep-alive usually keeps them on one).
"""

from __future__ import annotations

import math

__all__ = ["RateLimiter"]

_MAX_BUCKETS = 100_000  # forget everyone past this; a full bucket is the default anyway


class RateLimiter:
    """``rate`` events a second per name, in bursts of up to ``rate`` (one second's worth)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # name → (tokens, at)

    def take(self, name: str, now: float, cost: int = 1) -> float:
        """Spend ``cost`` tokens of ``name``'s bucket: 0 if allowed, else the seconds
        until it would be (and nothing is spent).

        A cost above the burst (a large batch) goes through on a full bucket and
        leaves it in debt, so the average rate still holds.
        """
        tokens, at = self._buckets.get(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        needed = min(cost, self.burst)
        if tokens >= needed:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._buckets.clear()
            self._buckets[name] = (tokens - cost, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (needed - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """A ``Retry-After`` value (whole seconds, at least 1) for a wait."""
        return max(1, math.ceil(wait))
