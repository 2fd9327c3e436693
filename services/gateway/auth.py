"""Per-key step quotas of the gateway. Who is calling (API keys, scopes, TLS) is services/auth.py, shared
with the job service."""

from __future__ import annotations

import threading
import time

from services.gateway.errors import ResourceExhausted


class StepQuota:
    """A token bucket per caller: `rate` steps/s sustained, bursts of up to one second's worth."""

    def __init__(self, rate: float):
        self.rate, self.burst = rate, max(1.0, rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, caller: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[caller] = (tokens, now)
                wait_s = (1 - tokens) / self.rate
                raise ResourceExhausted(f"this API key is over its quota of {self.rate:g} steps per second: "
                                        f"retry in {wait_s:.2f} s")
            self._buckets[caller] = (tokens - 1, now)
