"""Per-key token buckets (per user, per client address), in the process's memory.

Cheap enough for the hot path (no Redis call). Each worker process keeps its own
buckets, so with W workers behind one port a client gets up to W times the rate; put a
shared limiter at the edge if that matters more than the extra Redis round trip.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RateLimiter:
    rate: float                      # tokens per second; 0 disables the limiter
    burst: float = 0.0               # bucket size; default: max(1, rate)
    max_keys: int = 100_000
    _buckets: dict[object, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.burst <= 0:
            self.burst = max(1.0, self.rate)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: object, now: float | None = None) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until one is free."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            if len(self._buckets) >= self.max_keys and key not in self._buckets:
                self._prune(now)
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely (they hold no information)."""
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
